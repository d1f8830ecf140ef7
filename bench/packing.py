"""Micro-batch packing on the GSM8K length distribution: real tokens / padded tokens, ours vs the packer
of commit 72cfdd9 (kept below as ``baseline_pack``) and the per-rank packer of c84c859 (``per_rank_plan``),
side by side in one run.

    python -m bench.packing [--recipe qwen2_5_1_5b_gsm8k] [--batches 20] [--json bench/results/packing.json]

Lengths: each sample is a GSM8K train question (prompt) and an answer (response), in tokens estimated as
UTF-8 bytes / 4 (BPE tokenizers of the Qwen2.5 / Llama 3 family average about 4 bytes per token on
English text), plus 40 tokens of chat template around the prompt. An instruct model's chain of thought
is longer than GSM8K's terse reference solution: the response is the reference solution's estimate
times a factor drawn uniformly from [1, 4], capped at rollout.max_new_tokens. A batch is the recipe's
rollout.batch_prompts x n_samples samples (a group shares its prompt), split into ppo_n_minibatches
minibatches of whole groups, and each minibatch packed under trainer.max_tokens_per_mb for the DP ranks:
- ours (trainer.packing.plan_minibatch): the whole minibatch packed, the micro-batches dealt to the ranks;
- c84c859: the groups dealt to the ranks by tokens, each rank's share packed alone (the same packer);
- 72cfdd9: as c84c859, each share packed by the older packer.
Two numbers per packer: real / padded tokens over the whole batch, and real tokens / (DP x the busiest
rank's work per minibatch), work = padded tokens + 5% of a full micro-batch per micro-batch (its fixed
cost): the step waits for the busiest rank, so this is the share of the DP ranks' time spent on real tokens.
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


def per_rank_plan(lengths_by_group: list[list[int]], dp: int, max_tokens_per_mb: int, pad: int, packer):
    """c84c859's split of one minibatch: whole groups dealt to the ranks by tokens (largest first, to the
    rank with the fewest tokens so far), each rank's share packed alone by ``packer``: per rank, a list of
    (lengths of a micro-batch, seq_len)."""
    load, shares = [0] * dp, [[] for _ in range(dp)]
    for g in sorted(range(len(lengths_by_group)), key=lambda g: (-sum(lengths_by_group[g]), g)):
        r = min(range(dp), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(g)
        load[r] += sum(lengths_by_group[g])
    out = []
    for share in shares:
        lens = [L for g in sorted(share) for L in lengths_by_group[g]]
        out.append([([lens[i] for i in ix], S) for ix, S in packer(lens, max_tokens_per_mb, pad)])
    return out


def _batch(pool, rng, prompts: int, n: int, max_new: int) -> list[list[int]]:
    groups = []
    for p, r in rng.sample(pool, prompts):
        groups.append([p + min(max_new, math.ceil(r * rng.uniform(1.0, 4.0))) for _ in range(n)])
    return groups


def run(recipe_name: str, batches: int, seed: int = 0) -> dict:
    from megatron_a3po.config import load_recipe
    from megatron_a3po.trainer.packing import MB_OVERHEAD, pack_microbatches, plan_minibatch, split_minibatches

    rec = load_recipe(recipe_name)
    ro, tr, par = rec.rollout, rec.trainer, rec.parallel
    dp = rec.cluster.trainer_nodes * rec.cluster.gpus_per_node // (par.tp * par.pp)
    pad = par.tp if par.sequence_parallel and par.tp > 1 else 1
    cap, fixed = tr.max_tokens_per_mb, MB_OVERHEAD * tr.max_tokens_per_mb
    packers = {
        "ours": None,
        "c84c859": lambda lens, m, p: [(q.indices, q.seq_len) for q in pack_microbatches(lens, m, pad_multiple=p)],
        "72cfdd9": lambda lens, m, p: baseline_pack(lens, m),
    }
    pool = gsm8k_lengths()
    rng = random.Random(seed)
    tot = {k: [0, 0, 0, 0.0] for k in packers}  # real, padded, micro-batches, DP x busiest rank's work
    for _ in range(batches):
        groups = _batch(pool, rng, ro.batch_prompts, ro.n_samples, ro.max_new_tokens)
        for gidx in split_minibatches(len(groups), tr.ppo_n_minibatches):
            by_group = [groups[g] for g in gidx]
            lens = [L for g in by_group for L in g]
            for key, packer in packers.items():
                if packer is None:
                    ranks = [[([lens[i] for i in q.indices], q.seq_len) for q in mbs]
                             for mbs in plan_minibatch(lens, dp, cap, pad_multiple=pad)]
                else:
                    ranks = per_rank_plan(by_group, dp, cap, pad, packer)
                t = tot[key]
                t[0] += sum(lens)
                t[1] += sum(len(ls) * S for mbs in ranks for ls, S in mbs)
                t[2] += sum(len(mbs) for mbs in ranks)
                t[3] += dp * max(sum(len(ls) * S + fixed for ls, S in mbs) for mbs in ranks)
    n_shares = batches * tr.ppo_n_minibatches * dp
    return {
        "recipe": rec.name, "batches": batches, "dp": dp, "max_tokens_per_mb": cap, "pad_multiple": pad,
        "samples_per_batch": ro.batch_prompts * ro.n_samples,
        **{k: {"real_over_padded": t[0] / t[1], "micro_batches_per_share": t[2] / n_shares,
               "real_over_busiest_rank_work": t[0] / t[3]} for k, t in tot.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", action="append", default=None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "packing.json"))
    a = ap.parse_args(argv)
    out = [run(r, a.batches) for r in (a.recipe or ["qwen2_5_1_5b_gsm8k", "qwen2_5_7b_gsm8k", "qwen2_5_32b_gsm8k",
                                                       "llama3_70b_gsm8k"])]
    cols = list(out[0].keys())[6:]
    print(f"{'recipe':22} {'DP':>3} {'pad':>3} | " + " | ".join(f"{k + ' real/padded':>19} {'mbs':>5} {'busiest':>7}"
                                                          for k in cols))
    for r in out:
        print(f"{r['recipe']:22} {r['dp']:>3} {r['pad_multiple']:>3} | " + " | ".join(
            f"{r[k]['real_over_padded']:19.3f} {r[k]['micro_batches_per_share']:5.2f} "
            f"{r[k]['real_over_busiest_rank_work']:7.3f}" for k in cols))
    if a.json:
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
