"""What the benchmark scripts share: the ViT-B/16-sized random fixture and the marked sections
of BENCHMARKS.md."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def b16_model():
    """target/test-fixtures/b16-seed0/model.safetensors, made once by tests/python/make_fixture.py."""
    fx = os.path.join(ROOT, "target/test-fixtures/b16-seed0")
    if not os.path.exists(os.path.join(fx, ".complete")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tests/python/make_fixture.py"), fx, "--size", "b16"],
                       check=True)
        open(os.path.join(fx, ".complete"), "w").close()
    return os.path.join(fx, "model.safetensors")


def write_section(name, title, section):
    """Replaces (or appends) the BENCHMARKS.md block between `<!-- bench:NAME:start/end -->`."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nProduced by `make bench`.\n"
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n## {title}\n\n{section}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    open(path, "w").write(text)
