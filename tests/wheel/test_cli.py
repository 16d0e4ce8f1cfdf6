"""The console command and `python -m clipmask` are the binary: same output, files, exit codes
and signal handling."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, MODEL, generate_args, run_bin

CONSOLE = shutil.which("clipmask")


def commands():
    assert CONSOLE and Path(CONSOLE).parent == Path(sys.executable).parent, CONSOLE
    return {"console": [CONSOLE], "module": [sys.executable, "-m", "clipmask"]}


@pytest.mark.parametrize("kind", ["console", "module"])
def test_help_and_version_are_the_binarys(kind):
    cmd = commands()[kind]
    for args in (["--version"], ["--help"], ["generate", "--help"], ["eval", "-h"]):
        a = subprocess.run(cmd + args, capture_output=True, text=True)
        b = run_bin(*args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args


@pytest.mark.parametrize("kind", ["console", "module"])
def test_generate_writes_the_same_files(kind, work, binary_out, ids, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(commands()[kind] + [str(a) for a in generate_args(work, out, "--save-cams")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for i in ids:
        assert (out / "masks" / f"{i}.png").read_bytes() == (binary_out / "masks" / f"{i}.png").read_bytes()
        assert (out / "cams" / f"{i}.npz").read_bytes() == (binary_out / "cams" / f"{i}.npz").read_bytes()


@pytest.mark.parametrize("kind", ["console", "module"])
def test_errors_and_exit_codes_are_the_binarys(kind, work, tmp_path):
    cases = [
        ["generate", "--model", str(tmp_path / "missing.pt"), "--images", str(work), "--labels",
         str(work / "labels.json"), "--out", str(tmp_path / "o")],
        ["generate", "--no-such-flag"],
        ["eval", "--gt", str(tmp_path)],
        ["status", str(tmp_path / "nothing")],
    ]
    for args in cases:
        a = subprocess.run(commands()[kind] + args, capture_output=True, text=True)
        b = run_bin(*args, check=False)
        assert (a.returncode, a.stderr) == (b.returncode, b.stderr), args
        assert a.returncode != 0


@pytest.mark.parametrize("kind", ["console", "module"])
def test_closed_pipe_is_quiet(kind):
    p = subprocess.run(" ".join(map(str, commands()[kind])) + " prompts show --config voc12 | head -1",
                       shell=True, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip()


@pytest.mark.parametrize("kind", ["binary", "console", "module"])
def test_sigint_stops_like_the_binary(kind, voc, work, tmp_path):
    """The first SIGINT finishes the image in flight, writes the summary and exits 130."""
    import json

    all_ids = json.loads((voc / "labels.json").read_text())
    (tmp_path / "labels.json").write_text(json.dumps({i: all_ids[i] for i in all_ids}))
    cmd = [BIN] if kind == "binary" else commands()[kind]
    out = tmp_path / "out"
    args = ["generate", "--model", MODEL, "--device", "cpu", "--images", str(voc / "JPEGImages"), "--labels",
            str(tmp_path / "labels.json"), "--out", str(out), "--crf"]
    p = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((out / "masks").glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    n = len(list((out / "masks").glob("*.png")))
    assert 0 < n < len(all_ids)
    assert not [f for f in out.rglob("*") if ".tmp-" in f.name]
