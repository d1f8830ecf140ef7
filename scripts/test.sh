#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite on CPU.
# It also builds SGLang 0.5.23's own environment (scripts/sglang_env.sh; cached after the first time), the
# real server the rollout tests talk to: if that build fails, those tests are reported as skipped with the
# reason, never as passed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,launch
export A3PO_SGLANG_VENV="${A3PO_SGLANG_VENV:-$PWD/.venv-sglang}"
bash scripts/sglang_env.sh >/dev/null || echo "test.sh: SGLang's environment could not be built; the real-SGLang tests will be skipped (reason in $A3PO_SGLANG_VENV/.build-failed)" >&2
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -ra --durations=25 "$@"  # the slowest 25: the suite must stay under 25 min
