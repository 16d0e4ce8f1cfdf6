#!/usr/bin/env bash
# System packages the tests use: Debian's Chromium renders the eval report in a real browser.
# Best effort: without it that one check reports a skip instead of failing the suite.
set -u
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: installing chromium (eval report rendering test)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup-system: WARNING: could not install chromium; the browser check will be skipped" >&2
  else
    echo "setup-system: WARNING: chromium missing and not root; the browser check will be skipped" >&2
  fi
fi
# SLURM and munge for the cluster tests (tests/it/slurm.rs start a one-node cluster with
# scripts/slurm/local-cluster.sh; without them those tests fail with the reason).
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  bash scripts/slurm/local-cluster.sh install || echo "setup-system: WARNING: could not install slurm-wlm and munge" >&2
fi
exit 0
