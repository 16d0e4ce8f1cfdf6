"""Errors are Python exceptions with the CLI's messages; long calls release the GIL; Ctrl-C
raises KeyboardInterrupt promptly."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import clipmask
from conftest import MODEL, image_path, run_bin


def test_missing_files_are_file_not_found(gen, voc, ids, tmp_path):
    with pytest.raises(FileNotFoundError):
        clipmask.Model(tmp_path / "no-such-model.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such.jpg"):
        gen(tmp_path / "no-such.jpg", ["dog"])
    with pytest.raises(FileNotFoundError):
        clipmask.Config(str(tmp_path / "no-such-config.json"))
    with pytest.raises(FileNotFoundError):
        clipmask.evaluate(tmp_path / "no-pred", voc / "SegmentationClass")


def test_bad_input_is_value_error(gen, voc, ids, model):
    img = image_path(voc, ids[0])
    with pytest.raises(ValueError, match="no-such-class"):
        gen(img, ["no-such-class"])
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        gen(np.zeros((4, 4), dtype=np.uint8), ["dog"])
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        gen(np.zeros((4, 4, 3), dtype=np.float32), ["dog"])
    with pytest.raises(ValueError):
        gen(img, "dog")
    with pytest.raises(ValueError):
        gen(img, [99])
    with pytest.raises(ValueError, match="cam"):
        clipmask.Generator(model, "voc12", cam="no-such-source")
    with pytest.raises(ValueError, match="scale"):
        clipmask.Generator(model, "voc12", scales=(0.0,))
    r = gen(img, ["dog"])
    with pytest.raises(ValueError, match="alpha"):
        r.labels(alpha=-1)
    with pytest.raises(ValueError, match="probs"):
        clipmask.crf(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError):
        clipmask.Model(MODEL, device="tpu")


def test_messages_are_the_clis(tmp_path, work, voc):
    """A config error reads the same in Python as on the command line."""
    cfg = clipmask.Config("voc12").to_dict()
    cfg["classes"][1]["name"] = cfg["classes"][0]["name"].upper()
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        clipmask.Config(path)
    r = run_bin("generate", "--model", MODEL, "--config", path, "--images", voc / "JPEGImages", "--labels",
                work / "labels.json", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    assert str(e.value) == line[len("error: "):]
    with pytest.raises(ValueError) as e:
        clipmask.Config(cfg)
    assert "case" in str(e.value).lower() or cfg["classes"][0]["name"] in str(e.value)


def test_long_calls_release_the_gil(gen, voc, ids, labels):
    paths = [image_path(voc, i) for i in ids] * 2
    labs = [labels[i] for i in ids] * 2
    done = threading.Event()
    result = {}

    def work():
        result["maps"] = gen(paths, labs)
        done.set()

    t = threading.Thread(target=work)
    ticks = 0
    start = time.monotonic()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.monotonic() - start
    # The main thread kept running Python while the maps were computed.
    print(f"{ticks} main-thread ticks during {elapsed:.2f} s of maps")
    assert ticks > 20 * elapsed * 0.5
    assert len(result["maps"]) == len(paths)


def test_threads_give_the_same_maps(gen, voc, ids, labels):
    ref = [gen(image_path(voc, i), labels[i]).cams for i in ids]
    out = [None] * len(ids)

    def one(k):
        out[k] = gen(image_path(voc, ids[k]), labels[ids[k]]).cams

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(out, ref):
        assert np.array_equal(a, b)


SCRIPT = textwrap.dedent(
    """
    import sys, time, clipmask
    model = clipmask.Model(sys.argv[1], device="cpu")
    gen = clipmask.Generator(model, "voc12")
    img = sys.argv[2]
    print("ready", flush=True)
    try:
        if sys.argv[3] == "maps":
            while True:
                gen([img] * 8, [["person"]] * 8)
        else:
            gen.run(sys.argv[4], sys.argv[5], sys.argv[6], overwrite=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
        sys.exit(42)
    """
)


@pytest.mark.parametrize("mode", ["maps", "run"])
def test_ctrl_c_raises_keyboard_interrupt(tmp_path, voc, ids, work, mode):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    labels = {i: ["person"] for i in json.loads((voc / "labels.json").read_text())}
    (tmp_path / "all.json").write_text(json.dumps(labels))
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, str(script), MODEL, str(image_path(voc, ids[0])), mode, str(voc / "JPEGImages"),
         str(tmp_path / "all.json"), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 42, stderr
    at = float(stdout.split()[-1])
    print(f"{mode}: KeyboardInterrupt {at - sent:.2f} s after SIGINT")
    assert at - sent < 1.0
    if mode == "run":
        # Stopped as the CLI stops: no temporary file left, fewer masks than images.
        left = [f for f in out.rglob("*") if ".tmp-" in f.name]
        assert not left
        assert len(list((out / "masks").glob("*.png"))) < len(labels)
