"""Micro-batch packing on the GSM8K length distribution: real tokens / padded tokens, ours vs the packer
of commit 72cfdd9 (kept below as ``baseline_pack``), side by side in one run.

    python -m bench.packing [--recipe qwen2_5_1_5b_gsm8k] [--batches 20] [--json bench/results/packing.json]

Lengths: each sample is a GSM8K train question (prompt) and an answer (response), in tokens estimated as
UTF-8 bytes / 4 (BPE tokenizers of the Qwen2.5 / Llama 3 family average about 4 bytes per token on
English text), plus 40 tokens of chat template around the prompt. An instruct model's chain of thought
is longer than GSM8K's terse reference solution: the response is the reference solution's estimate
times a factor drawn uniformly from [1, 4], capped at rollout.max_new_tokens. A batch is the recipe's
rollout.batch_prompts x n_samples samples (a group shares its prompt), split the way the trainer splits
it (trainer.packing.plan_data_parallel: ppo_n_minibatches minibatches, dealt to the DP ranks by tokens),
and each DP rank's share of each minibatch is packed under trainer.max_tokens_per_mb.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TEMPLATE_TOKENS = 40
BYTES_PER_TOKEN = 4.0


def gsm8k_lengths(path: Path = GSM8K) -> list[tuple[int, int]]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        p = TEMPLATE_TOKENS + math.ceil(len(d["question"].encode()) / BYTES_PER_TOKEN)
        r = math.ceil(len(d["answer"].encode()) / BYTES_PER_TOKEN)
        out.append((p, r))
    return out


def baseline_pack(lengths: list[int], max_tokens_per_mb: int):
    """The packer of commit 72cfdd9 (block count from a sorted next-fit, then samples dealt longest
    first to the block whose padded size stays smallest): list of (indices, seq_len)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, cur, cur_max = [], [], 0
    for i in order:
        L = lengths[i]
        new_max = max(cur_max, L)
        if cur and (len(cur) + 1) * new_max > max_tokens_per_mb:
            bins.append(cur)
            cur, new_max = [], L
        cur.append(i)
        cur_max = new_max
    if cur:
        bins.append(cur)
    n_bins = min(len(bins), len(lengths))
    while True:
        blocks = [[] for _ in range(n_bins)]
        maxes = [0] * n_bins
        ok = True
        for i in order:
            L = lengths[i]
            best, best_key = -1, None
            for b in range(n_bins):
                m = max(maxes[b], L)
                size = (len(blocks[b]) + 1) * m
                if size > max_tokens_per_mb:
                    continue
                key = (size, size - len(blocks[b]) * maxes[b])
                if best < 0 or key < best_key:
                    best, best_key = b, key
            if best < 0:
                ok = False
                break
            blocks[best].append(i)
            maxes[best] = max(maxes[best], L)
        if ok:
            return [(b, maxes[k]) for k, b in enumerate(blocks) if b]
        n_bins += 1


def _batch(pool, rng, prompts: int, n: int, max_new: int) -> list[list[int]]:
    groups = []
    for p, r in rng.sample(pool, prompts):
        groups.append([p + min(max_new, math.ceil(r * rng.uniform(1.0, 4.0))) for _ in range(n)])
    return groups


def run(recipe_name: str, batches: int, seed: int = 0) -> dict:
    from megatron_a3po.config import load_recipe
    from megatron_a3po.trainer.packing import pack_microbatches, plan_data_parallel

    rec = load_recipe(recipe_name)
    ro, tr, par = rec.rollout, rec.trainer, rec.parallel
    dp = rec.cluster.trainer_nodes * rec.cluster.gpus_per_node // (par.tp * par.pp)
    pad = par.tp if par.sequence_parallel and par.tp > 1 else 1
    pool = gsm8k_lengths()
    rng = random.Random(seed)
    tot = {"ours": [0, 0, 0], "baseline": [0, 0, 0]}  # real, padded, micro-batches
    for _ in range(batches):
        groups = _batch(pool, rng, ro.batch_prompts, ro.n_samples, ro.max_new_tokens)
        plan = plan_data_parallel([sum(g) for g in groups], tr.ppo_n_minibatches, dp)
        for mb in plan:
            for share in mb:
                lens = [L for gi in share for L in groups[gi]]
                real = sum(lens)
                ours = pack_microbatches(lens, tr.max_tokens_per_mb, pad_multiple=pad)
                base = baseline_pack(lens, tr.max_tokens_per_mb)
                for key, blocks in (("ours", [(p.indices, p.seq_len) for p in ours]), ("baseline", base)):
                    tot[key][0] += real
                    tot[key][1] += sum(len(ix) * S for ix, S in blocks)
                    tot[key][2] += len(blocks)
    n_shares = batches * tr.ppo_n_minibatches * dp
    return {
        "recipe": rec.name, "batches": batches, "dp": dp, "max_tokens_per_mb": tr.max_tokens_per_mb,
        "pad_multiple": pad, "samples_per_batch": ro.batch_prompts * ro.n_samples,
        "ours": {"real_over_padded": tot["ours"][0] / tot["ours"][1], "micro_batches_per_share": tot["ours"][2] / n_shares},
        "baseline_72cfdd9": {"real_over_padded": tot["baseline"][0] / tot["baseline"][1],
                             "micro_batches_per_share": tot["baseline"][2] / n_shares},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", action="append", default=None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "packing.json"))
    a = ap.parse_args(argv)
    out = [run(r, a.batches) for r in (a.recipe or ["qwen2_5_1_5b_gsm8k", "qwen2_5_7b_gsm8k", "qwen2_5_32b_gsm8k",
                                                       "llama3_70b_gsm8k"])]
    print(f"{'recipe':22} {'DP':>3} {'pad':>3} | {'ours real/padded':>16} {'mbs':>5} | {'72cfdd9 real/padded':>19} {'mbs':>5}")
    for r in out:
        print(f"{r['recipe']:22} {r['dp']:>3} {r['pad_multiple']:>3} | {r['ours']['real_over_padded']:16.3f} "
              f"{r['ours']['micro_batches_per_share']:5.2f} | {r['baseline_72cfdd9']['real_over_padded']:19.3f} "
              f"{r['baseline_72cfdd9']['micro_batches_per_share']:5.2f}")
    if a.json:
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
