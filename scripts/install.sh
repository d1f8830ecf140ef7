#!/usr/bin/env bash
# Installs the project into ./.venv (created if missing), at the versions of constraints.txt (what CI
# tested; A3PO_UNPINNED=1: the newest pyproject.toml allows, to refresh that file with scripts/lock.sh).
# Idempotent: a second call with the same pyproject.toml, constraints and extras returns at once.
# Usage: scripts/install.sh [EXTRAS]   (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pins=()
if [ -z "${A3PO_UNPINNED:-}" ]; then
  pins=(-c constraints.txt)
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)-${extras//,/_}${A3PO_UNPINNED:+-unpinned}"
if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! python -c "import torch" 2>/dev/null; then
    # CPU machines: torch 2.13.0 is a local wheel (pip's find-links); GPU containers already have torch.
    pip install -q "${pins[@]}" "torch==2.13.0"
  fi
  pip install -q "${pins[@]}" -e ".[${extras}]"
  touch "$stamp"
fi
