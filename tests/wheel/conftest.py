"""Fixtures of the wheel's test suite: it runs against the *installed* clipmask (a fresh venv,
scripts/test-wheel.sh), with the Rust binary built from the same checkout as the reference."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(os.environ.get("CLIPMASK_SOURCE", Path(__file__).resolve().parents[2]))
BIN = os.environ.get("CLIPMASK_BIN", str(ROOT / "target/release/clipmask"))
MODEL = os.environ.get("CLIPMASK_TEST_MODEL", str(ROOT / "target/test-fixtures/tiny-seed0-ls10/model.safetensors"))
VOC = Path(os.environ.get("CLIPMASK_VOC_SAMPLE", ROOT.parent / "shared/data/voc-sample"))
N_IDS = 4
# Copies of each photo in a tree made from examples/ (when voc-sample is absent), so that runs
# are long enough to interrupt.
COPIES = 10


def pytest_configure(config):
    import clipmask

    # The suite tests the installed package, never the source tree.
    assert "site-packages" in clipmask.__file__, clipmask.__file__
    assert Path(MODEL).is_file(), f"test model {MODEL} missing (make test builds it with the Rust tests)"


@pytest.fixture(scope="session")
def voc(tmp_path_factory):
    """A VOC-layout sample (JPEGImages, labels.json, SegmentationClass): voc-sample when
    present, else one made from the VOC photos in examples/images, each also copied under
    later ids, with the binary's masks as its ground truth."""
    if (VOC / "JPEGImages").is_dir():
        return VOC
    import shutil

    d = tmp_path_factory.mktemp("voc")
    (d / "JPEGImages").mkdir()
    src = json.loads((ROOT / "examples/labels.json").read_text())
    labels = {}
    for i, names in src.items():
        for k in range(COPIES):
            new = i if k == 0 else f"zz{k:02d}_{i}"
            shutil.copy(ROOT / "examples/images" / f"{i}.jpg", d / "JPEGImages" / f"{new}.jpg")
            labels[new] = names
    (d / "labels.json").write_text(json.dumps(labels))
    out = d / "gt-run"
    run_bin("generate", "--model", MODEL, "--device", "cpu", "--images", d / "JPEGImages", "--labels",
            d / "labels.json", "--out", out)
    (out / "masks").rename(d / "SegmentationClass")
    shutil.rmtree(out)
    return d


@pytest.fixture(scope="session")
def ids(voc):
    labels = json.loads((voc / "labels.json").read_text())
    return sorted(labels)[:N_IDS]


@pytest.fixture(scope="session")
def labels(voc, ids):
    all_labels = json.loads((voc / "labels.json").read_text())
    return {i: all_labels[i] for i in ids}


@pytest.fixture(scope="session")
def work(tmp_path_factory, voc, ids, labels):
    d = tmp_path_factory.mktemp("work")
    (d / "images-dir").write_text(str(voc / "JPEGImages"))
    (d / "split.txt").write_text("\n".join(ids) + "\n")
    (d / "labels.json").write_text(json.dumps(labels))
    return d


def run_bin(*args, env=None, check=True):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"clipmask {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
    return r


def generate_args(work, out, *extra):
    return ["generate", "--model", MODEL, "--config", "voc12", "--device", "cpu", "--images", (work / "images-dir").read_text(),
            "--labels", work / "labels.json", "--split", work / "split.txt", "--out", out, *extra]


@pytest.fixture(scope="session")
def binary_out(work):
    """The binary's outputs on the sample: masks and maps."""
    out = work / "bin-out"
    run_bin(*generate_args(work, out, "--save-cams"))
    return out


@pytest.fixture(scope="session")
def binary_crf_out(work):
    out = work / "bin-crf-out"
    run_bin(*generate_args(work, out, "--crf"))
    return out


@pytest.fixture(scope="session")
def model():
    import clipmask

    return clipmask.Model(MODEL, device="cpu")


@pytest.fixture(scope="session")
def gen(model):
    import clipmask

    return clipmask.Generator(model, "voc12")


def read_mask(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def image_path(voc, i):
    return voc / "JPEGImages" / f"{i}.jpg"
