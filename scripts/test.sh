#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,launch
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -ra "$@"
