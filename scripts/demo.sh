#!/usr/bin/env bash
# The main job: a real A-3PO training run of a tiny model on this CPU with the bundled rollout server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
exec python -m megatron_a3po.trainer --recipe recipes/demo_cpu.yaml "$@"
