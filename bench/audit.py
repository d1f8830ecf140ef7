"""The shadow-recompute audit's cost against recompute's, side by side in one process (trainer/audit.py).

One fixed batch of samples (bench.e2e's: random tokens, behaviour log-probs near the model's own,
staleness 1-3) is replayed every step to two actors built from the same weights: ``recompute`` (a
forward pass over the whole batch every step) and ``loglinear`` with the audit at its defaults (recipe
section ``audit``: every ``audit.every`` steps, a forward pass over ``audit.fraction`` of the
micro-batches, and the error measures of those). Their steps are interleaved so the
machine's load hits both alike. Before the timed steps each actor takes one warm-up step, an audited one
for the audited actor (the first forward-only pass of an actor pays one-time costs: 0.9 of a whole
recompute pass in a first try of this script, 0.06 at the next audit). Reported, over the same steps:

    ratio = sum(time/audit of the audited actor) / sum(time/prox_logp of the recompute actor)

(target <= 0.05 at the defaults), and, on the audited steps only, the audit's forward pass against
recompute's on that step (about the fraction of micro-batches audited).

    python -m bench.audit [--steps 20 --hidden 256 --layers 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.common import RESULTS, machine
from bench.e2e import add_batch_args, model_and_batch


def _recipe(mode, args, audit: dict):
    from megatron_a3po.config import Recipe

    return Recipe.model_validate({
        "name": f"bench_audit_{mode}", "model": {"hf_path": "unused"},
        "trainer": {"mode": mode, "lr": 1e-5, "ppo_n_minibatches": args.minibatches,
                    "max_tokens_per_mb": args.max_tokens_per_mb, "steps": args.steps},
        "rollout": {"n_samples": args.n_samples, "temperature": 1.0}, "audit": audit,
    })


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap, layers=4)
    ap.set_defaults(hidden=256, batch=8, response_len=64, max_tokens_per_mb=640)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per actor (a multiple of audit.every)")
    ap.add_argument("--out", default=str(RESULTS / "audit.json"))
    args = ap.parse_args(argv)

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_a3po.platform.procs import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from megatron_a3po import metrics as M
    from megatron_a3po.config import AuditCfg
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor

    defaults = AuditCfg()
    audit = {"enabled": True}  # the defaults otherwise (every, fraction, threshold, patience, policy warn)
    init_distributed(tp=1, pp=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, samples = model_and_batch(tmp, args)
        actors = {"recompute": build_actor(_recipe("recompute", args, {}), cfg, hf_dir=str(hf_dir)),
                  "loglinear+audit": build_actor(_recipe("loglinear", args, audit), cfg, hf_dir=str(hf_dir))}
        rows = {m: [] for m in actors}
        audited = actors["loglinear+audit"]
        audited.step_count = audited.auditor.cfg.every - 1  # the warm-up step is an audited one
        for actor in actors.values():
            actor.train_step(samples, 9, group_size=args.n_samples)
            actor.step_count = 0
        t0 = time.perf_counter()
        for step in range(args.steps):
            for mode, actor in actors.items():
                st = actor.train_step(samples, 10 + step, group_size=args.n_samples)
                rows[mode].append({"prox_s": st[M.TIME_PROX], "audit_s": st.get(M.TIME_AUDIT, 0.0),
                                   "audited": M.AUDIT_ERR in st, "tokens_frac": st.get(M.AUDIT_TOKENS_FRAC),
                                   "step_s": st["time/train"]})
        wall = time.perf_counter() - t0
    rec = sum(r["prox_s"] for r in rows["recompute"])
    aud = sum(r["audit_s"] for r in rows["loglinear+audit"])
    on = [k for k, r in enumerate(rows["loglinear+audit"]) if r["audited"]]
    per_audit = [rows["loglinear+audit"][k]["audit_s"] / rows["recompute"][k]["prox_s"] for k in on]
    res = {
        "machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "out"},
        "audit": {**defaults.model_dump(), **audit},
        "recompute_prox_s_total": rec, "audit_s_total": aud, "ratio": aud / rec,
        "audited_steps": [k + 1 for k in on], "audit_tokens_frac": [rows["loglinear+audit"][k]["tokens_frac"] for k in on],
        "per_audit_step_ratio": per_audit,
        "audit_s_on_other_steps_mean": (sum(r["audit_s"] for k, r in enumerate(rows["loglinear+audit"]) if k not in on)
                                        / max(1, args.steps - len(on))),
        "wall_s": wall, "raw": rows,
    }
    print(f"{res['machine']}: {args.steps} steps; recompute's forward passes {rec:.3f} s, the audit {aud:.3f} s: "
          f"ratio {res['ratio']:.4f} (target <= 0.05); on the audited steps {[round(x, 3) for x in per_audit]} "
          f"of recompute's pass, covering {res['audit_tokens_frac']} of the tokens")
    from megatron_a3po.io import write_json_atomic

    write_json_atomic(args.out, res)
    print(f"saved {args.out}")
    return res


if __name__ == "__main__":
    main()
