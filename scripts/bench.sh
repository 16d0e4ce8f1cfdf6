#!/usr/bin/env bash
# `make bench`: speed of clipmask against the straightforward PyTorch pipeline, measured in the
# same run on the same machine, model and images; results go to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python bench/bench.py "$@"
.venv/bin/python bench/sources.py
