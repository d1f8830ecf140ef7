#!/usr/bin/env bash
# GPU smoke test on ONE H100/H200 (under 10 minutes). UNVERIFIED: it has not yet run on a GPU (docs/benchmarks.md).
#
#   bash scripts/gpu_smoke.sh --model DIR [--steps N] [--out DIR] [--dry-run]
#
#   --model DIR   a local Qwen2.5-1.5B-Instruct HF directory (nothing is downloaded)
#   --steps N     trainer steps (default 3)
#   --out DIR     where runs and results go (default runs/gpu_smoke)
#   --dry-run     print every command, check that each command's flags exist in the installed tools, run
#                 nothing (the suite runs this on CPU: tests/test_gpu_smoke.py)
#
# It installs what the node lacks (the project's extras, SGLang), trains the 1.5B recipe at TP=1 for a few
# steps with a real SGLang engine on the same GPU (disk weight sync, the engine at a third of the memory),
# runs bench/loss.py on the GPU, and prints the proximal log-prob ratio, the step time and the MFU.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
model="" steps=3 out="runs/gpu_smoke" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || { echo "gpu_smoke: --model needs a directory" >&2; exit 2; }; model="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || { echo "gpu_smoke: --steps needs a number" >&2; exit 2; }; steps="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_smoke: --out needs a directory" >&2; exit 2; }; out="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_smoke: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$steps" in ''|*[!0-9]*) echo "gpu_smoke: --steps must be a positive integer, got '$steps'" >&2; exit 2 ;; esac
[ "$steps" -ge 1 ] || { echo "gpu_smoke: --steps must be >= 1" >&2; exit 2; }
if [ -z "$model" ]; then
  [ "$dry" = 1 ] && model="/models/Qwen2.5-1.5B-Instruct" || { echo "gpu_smoke: --model DIR is required" >&2; exit 2; }
fi
if [ "$dry" = 0 ] && [ ! -f "$model/config.json" ]; then
  echo "gpu_smoke: --model $model: no config.json there" >&2; exit 2
fi

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
RECIPE=qwen2_5_1_5b_gsm8k
OVERRIDES=(
  "model.hf_path=$model" "trainer.steps=$steps" "trainer.save_every=0" "trainer.eval_every=0"
  "trainer.log_dir=$out/train" "trainer.mode=metrics" "parallel.tp=1" "parallel.pp=1" "parallel.dp=1"
  "rollout.num_engines=1" "rollout.engine_tp=1" "rollout.weight_sync=disk" "rollout.mem_fraction_static=0.3"
  "rollout.batch_prompts=32" "rollout.n_samples=4" "rollout.max_new_tokens=512" "trainer.ppo_n_minibatches=2"
  "cluster.trainer_nodes=1" "cluster.rollout_nodes=1" "cluster.gpus_per_node=1"
)
CMDS=(
  "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader"
  "bash scripts/install.sh dev,launch"
  "$PY -m pip install --quiet sglang"
  "$PY -m megatron_a3po.trainer --recipe $RECIPE --run-dir $out/train ${OVERRIDES[*]}"
  "$PY -m bench.loss --part ab --tokens 8192 --reps 3 --out $out/loss.json"
)

check_flags() {  # every --flag of a command must appear in its own --help
  local cmd="$1" help
  read -r -a w <<< "$cmd"
  case "${w[0]}" in
    bash) [ -f "${w[1]}" ] || { echo "  MISSING script ${w[1]}"; return 1; }; echo "  ok: ${w[1]} exists"; return 0 ;;
    nvidia-smi) if ! command -v nvidia-smi >/dev/null; then echo "  skip: nvidia-smi is not installed here (GPU node tool)"; return 0; fi
                help="$(nvidia-smi --help 2>&1)" ;;
    *) if [ "${w[1]}" = "-m" ] && [ "${w[2]}" = "pip" ]; then help="$("${w[0]}" -m pip "${w[3]}" --help 2>&1)"
       elif [ "${w[1]}" = "-m" ]; then help="$("${w[0]}" -m "${w[2]}" --help 2>&1)"
       else help="$("${w[0]}" --help 2>&1)"; fi ;;
  esac
  local bad=0
  for t in "${w[@]}"; do
    case "$t" in
      --*) f="${t%%=*}"; if grep -q -- "$f" <<< "$help"; then :; else echo "  UNKNOWN flag $f"; bad=1; fi ;;
    esac
  done
  [ "$bad" = 0 ] && echo "  ok: flags exist"
  return $bad
}

if [ "$dry" = 1 ]; then
  rc=0
  for c in "${CMDS[@]}"; do echo "+ $c"; check_flags "$c" || rc=1; done
  # the trainer's dotted overrides must be keys of the recipe schema
  if "$PY" -c "import sys; from megatron_a3po.config import load_recipe; load_recipe(sys.argv[1], sys.argv[2:])" \
      "$RECIPE" "${OVERRIDES[@]}" 2>/tmp/gpu_smoke_overrides.$$; then
    echo "  ok: recipe overrides are valid"
  else
    echo "  BAD overrides: $(tail -3 /tmp/gpu_smoke_overrides.$$)"; rc=1
  fi
  rm -f /tmp/gpu_smoke_overrides.$$
  exit $rc
fi

mkdir -p "$out"
t0=$(date +%s)
echo "+ ${CMDS[0]}"; ${CMDS[0]}
echo "+ ${CMDS[1]}"; ${CMDS[1]}
if ! "$PY" -c "import sglang" 2>/dev/null; then echo "+ ${CMDS[2]}"; ${CMDS[2]}; fi
echo "+ ${CMDS[3]}"; "$PY" -m megatron_a3po.trainer --recipe "$RECIPE" --run-dir "$out/train" "${OVERRIDES[@]}"
echo "+ ${CMDS[4]}"; ${CMDS[4]}
"$PY" - "$out" "$model" <<'EOF'
import json, sys
from pathlib import Path
out, model = Path(sys.argv[1]), sys.argv[2]
recs = [json.loads(l) for l in (out / "train" / "steps.jsonl").read_text().splitlines() if l.strip()]
from launch.arch import num_params
from megatron_a3po.models import arch_from_config_json
P = num_params(arch_from_config_json(Path(model) / "config.json"))
last = recs[-1]["stats"]
step_s = last.get("time/step", float("nan"))
tok = last.get("train/tok_s", 0.0) * last.get("time/train", 0.0)
peak = 989e12  # H100 SXM dense bf16; an H200 has the same
print(f"GPU smoke: {len(recs)} steps; step time {step_s:.2f}s; MFU {6 * P * tok / max(step_s, 1e-9) / peak:.3f}")
for k, v in sorted(last.items()):
    if "prox" in k or "approx" in k:
        print(f"  {k} = {v}")
EOF
echo "GPU smoke done in $(( $(date +%s) - t0 ))s"
