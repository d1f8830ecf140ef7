"""``python -m tools.replay RUN_A RUN_B [--steps N]``: compare two runs' steps.jsonl bit for bit, apart from
time, throughput and rollout-progress stats (megatron_a3po.rollout.schedule.compare_step_records); exit 0
when identical, 1 with the differing steps and fields otherwise."""

import argparse
import sys
from pathlib import Path

from megatron_a3po.rollout.schedule import TIMING_PREFIXES, compare_step_records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.replay", description=__doc__)
    ap.add_argument("run_a", help="a run directory (or its steps.jsonl)")
    ap.add_argument("run_b")
    ap.add_argument("--steps", type=int, default=None, help="compare the first N steps (default: all of the shorter)")
    args = ap.parse_args(argv)
    paths = [Path(p) / "steps.jsonl" if Path(p).is_dir() else Path(p) for p in (args.run_a, args.run_b)]
    for p in paths:
        if not p.is_file():
            print(f"error: {p}: no such file", file=sys.stderr)
            return 2
    n, diffs = compare_step_records(*paths, steps=args.steps)
    if diffs:
        print(f"{len(diffs)} of {n} step records differ:")
        for d in diffs[:20]:
            print(f"  {d}")
        return 1
    print(f"bit-identical: {n} step records (every field but {', '.join(TIMING_PREFIXES)} stats and eval timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
