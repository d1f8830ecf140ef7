"""Rollout benchmark on CPU: engine alone vs through our fleet client + controller, and the trainer's
wait time per step with synchronous (max_staleness 0) vs asynchronous (max_staleness 2) rollouts.

    python -m bench.rollout [--groups 32] [--n 4] [--max-new-tokens 48] [--engines 1] [--quick]

Prints a table, writes bench/results/rollout.json and the "Rollout" section of docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

from bench.common import machine, parse_args

ROOT = Path(__file__).resolve().parents[1]
CHARS = "0123456789+-=* abcdefghijklmnopqrstuvwxyz"


def make_model(root: Path):
    from megatron_a3po.models.tiny import build_char_tokenizer, save_tiny_hf_model

    tok = build_char_tokenizer(CHARS)
    kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, max_position_embeddings=256)
    return tok, [str(save_tiny_hf_model(root / f"w{i}", "qwen2", seed=i, tokenizer=tok, **kw)) for i in range(2)]


def prompts(tok, n):
    from megatron_a3po.rollout.data import Prompt

    return [Prompt(i, tok(f"{i % 97}+{i % 13}=")["input_ids"], {"x": ""}) for i in range(n)]


async def engine_alone(urls, ps, n, max_new, inflight):
    """The same workload sent straight to the engines: one request per sample, `inflight` groups at a time."""
    import httpx

    sem = asyncio.Semaphore(inflight)
    toks = 0
    async with httpx.AsyncClient(timeout=600) as c:
        async def group(i, p):
            nonlocal toks
            async with sem:
                rs = await asyncio.gather(*(c.post(f"{urls[(i + j) % len(urls)]}/generate", json={
                    "input_ids": p.prompt_ids, "return_logprob": True,
                    "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}) for j in range(n)))
                toks += sum(len(r.json()["output_ids"]) for r in rs)

        t0 = time.perf_counter()
        await asyncio.gather(*(group(i, p) for i, p in enumerate(ps)))
        return toks, time.perf_counter() - t0


def zero_reward(text: str, rec: dict) -> float:
    """The benchmark's reward (module-level: rewards run in worker processes, rollout/rewards.py)."""
    return 0.0


def controller_run(urls, tok, ps, n, max_new, inflight):
    from megatron_a3po.rollout import ControllerConfig, RolloutManager
    from megatron_a3po.rollout.tasks import Task

    task = Task("bench", ("x",), None, zero_reward)
    cfg = ControllerConfig(n_samples=n, max_inflight_groups=inflight, batch_groups=len(ps), max_staleness=0,
                           max_new_tokens=max_new, extra_sampling={"ignore_eos": True}, shuffle=False, epochs=1)
    rm = RolloutManager(urls, ps, task, tok, cfg)
    rm.start()
    t0 = time.perf_counter()
    b = rm.get_batch(len(ps), 0, timeout=1200)
    dt = time.perf_counter() - t0
    rm.close()
    return b.num_tokens, dt


def trainer_loop(urls, dirs, tok, ps, n, max_new, staleness, steps, groups, train_s):
    from megatron_a3po.rollout import ControllerConfig, RolloutManager
    from megatron_a3po.rollout.tasks import Task

    task = Task("bench", ("x",), None, zero_reward)
    cfg = ControllerConfig(n_samples=n, max_inflight_groups=4 * groups, batch_groups=groups, max_staleness=staleness,
                           max_new_tokens=max_new, extra_sampling={"ignore_eos": True})
    rm = RolloutManager(urls, ps, task, tok, cfg)
    rm.start()
    waits, syncs, stale = [], [], []
    t_all = time.perf_counter()
    for v in range(steps):
        t0 = time.perf_counter()
        b = rm.get_batch(groups, v, timeout=1200)
        waits.append(time.perf_counter() - t0)
        stale += b.staleness()
        time.sleep(train_s)  # the optimizer step
        t0 = time.perf_counter()
        rm.update_weights(v + 1, hf_dir=dirs[(v + 1) % 2])
        syncs.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    m = rm.metrics()
    rm.close()
    # reset engines to version 0 weights for the next run
    import httpx

    for u in urls:
        httpx.post(f"{u}/update_weights_from_disk", json={"model_path": dirs[0], "weight_version": "0"}, timeout=120)
    return {"max_staleness": staleness, "steps": steps, "wait_s_mean": sum(waits) / steps,
            "wait_s_first": waits[0], "wait_s_mean_after_first": sum(waits[1:]) / max(1, steps - 1),
            "weight_sync_s_mean": sum(syncs) / steps, "step_s_mean": total / steps,
            "staleness_mean": sum(stale) / max(1, len(stale)), "staleness_max": max(stale) if stale else 0,
            "aborted_resumed": m.get("rollout/requests_aborted_resumed", 0),
            "groups_dropped_stale": m.get("rollout/groups_dropped_stale", 0)}


def write_docs(res: dict):
    doc = ROOT / "docs" / "benchmarks.md"
    doc.parent.mkdir(exist_ok=True)
    a = res["throughput"]
    lines = [
        "## Rollout",
        "",
        f"`python -m bench.rollout` on {res['cpu']} ({res['threads']} torch thread per engine, {res['engines']} "
        f"engine(s)); tiny Qwen2 (hidden 128, 4 layers), {res['groups']} prompts x {res['n']} samples x "
        f"{res['max_new_tokens']} new tokens, {res['inflight']} groups in flight, median of {res['repeats']} runs "
        "each. The machine's 2 cores were shared with other jobs: expect noise of +-15%. Raw numbers: "
        "`bench/results/rollout.json`.",
        "",
        "| path | tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|",
        f"| engine alone (direct HTTP) | {a['engine_tokens']} | {a['engine_s']:.2f} | {a['engine_tok_s']:.0f} |",
        f"| client + controller | {a['controller_tokens']} | {a['controller_s']:.2f} | {a['controller_tok_s']:.0f} |",
        f"| overhead ratio (engine / controller tok/s) | | | {a['overhead_ratio']:.3f} |",
        "",
        f"Trainer-side wait per step ({res['loop_steps']} steps of {res['loop_groups']} groups, a simulated "
        f"{res['train_s']} s optimizer step, disk weight sync every step):",
        "",
        "| max_staleness | wait s/step (mean) | wait after step 0 | weight sync s | step s | token staleness mean / max |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["trainer_wait"]:
        lines.append(f"| {r['max_staleness']} | {r['wait_s_mean']:.3f} | {r['wait_s_mean_after_first']:.3f} | "
                     f"{r['weight_sync_s_mean']:.3f} | {r['step_s_mean']:.3f} | {r['staleness_mean']:.2f} / "
                     f"{r['staleness_max']} |")
    section = "\n".join(lines) + "\n"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if "## Rollout" in text:
        text = re.sub(r"## Rollout\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def main(argv=None):
    args = parse_args(argv, groups=32, n=4, max_new_tokens=48, inflight=8, engines=1, repeats=3, loop_steps=10,
                      loop_groups=4, train_s=1.0, quick=False, no_docs=False,
                      helps={"quick": "a smaller run (smoke test)"})
    if args.quick:
        args.groups, args.max_new_tokens, args.loop_steps, args.repeats = 8, 16, 3, 1

    from megatron_a3po.engine.launch import launch_engines
    from megatron_a3po.io import write_json_atomic

    with tempfile.TemporaryDirectory() as tmp:
        tok, dirs = make_model(Path(tmp))
        eps = launch_engines(dirs[0], n=args.engines, version="0")
        urls = [e.url for e in eps]
        try:
            ps = prompts(tok, args.groups)
            asyncio.run(engine_alone(urls, ps[:2], args.n, 4, args.inflight))  # warm-up
            # alternate the two paths, `repeats` times each; report the median wall time of each
            e_runs, c_runs = [], []
            for _ in range(args.repeats):
                e_runs.append(asyncio.run(engine_alone(urls, ps, args.n, args.max_new_tokens, args.inflight)))
                c_runs.append(controller_run(urls, tok, ps, args.n, args.max_new_tokens, args.inflight))
            et, es = sorted(e_runs, key=lambda x: x[1])[len(e_runs) // 2]
            ct, cs = sorted(c_runs, key=lambda x: x[1])[len(c_runs) // 2]
            loop_ps = prompts(tok, 400)
            waits = [trainer_loop(urls, dirs, tok, loop_ps, args.n, args.max_new_tokens, s, args.loop_steps,
                                  args.loop_groups, args.train_s) for s in (0, 2)]
        finally:
            for e in eps:
                e.stop()
    res = {
        "cpu": machine(), "threads": 1, "engines": args.engines, "groups": args.groups, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "inflight": args.inflight, "repeats": args.repeats,
        "throughput": {"engine_tokens": et, "engine_s": es, "engine_tok_s": et / es, "controller_tokens": ct,
                       "controller_s": cs, "controller_tok_s": ct / cs, "overhead_ratio": (et / es) / (ct / cs)},
        "loop_steps": args.loop_steps, "loop_groups": args.loop_groups, "train_s": args.train_s,
        "trainer_wait": waits,
    }
    print(f"{'path':<28}{'tokens':>8}{'s':>8}{'tok/s':>10}")
    t = res["throughput"]
    print(f"{'engine alone':<28}{et:>8}{es:>8.2f}{t['engine_tok_s']:>10.0f}")
    print(f"{'client + controller':<28}{ct:>8}{cs:>8.2f}{t['controller_tok_s']:>10.0f}")
    print(f"overhead ratio (engine/controller tok/s): {t['overhead_ratio']:.3f}")
    print(f"{'max_staleness':>13}{'wait/step':>11}{'wait>0':>9}{'sync':>8}{'step':>8}{'stale':>8}")
    for r in waits:
        print(f"{r['max_staleness']:>13}{r['wait_s_mean']:>11.3f}{r['wait_s_mean_after_first']:>9.3f}"
              f"{r['weight_sync_s_mean']:>8.3f}{r['step_s_mean']:>8.3f}{r['staleness_mean']:>8.2f}")
    if not args.quick:
        write_json_atomic(ROOT / "bench" / "results" / "rollout.json", res)
        if not args.no_docs:
            write_docs(res)
    return res


if __name__ == "__main__":
    main()
