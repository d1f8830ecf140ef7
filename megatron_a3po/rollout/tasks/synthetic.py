"""The CPU demo's task: name the largest of a few digits.

Prompt: the digits (e.g. ``381``) through the character tokenizer's chat template; the correct
response is the largest digit followed by end-of-sequence (``8<eos>``). Reward 1 for exactly that,
else 0, so a policy that answers with a uniformly random digit scores ~0.1. A tiny transformer can
learn it by RL on two CPU cores in a few minutes, which makes the reward curve an honest signal.

Held-out evaluation (recipe ``data.synthetic.eval_holdout: N``): N distinct digit strings are drawn
once (a fixed seed), left out of the training set, and form the eval set, so the eval accuracy measures
prompts the policy never trained on.

The optional warm start (recipe: ``trainer.warm_start_steps``) teaches only the answer *format*
(one digit, then stop): its targets are random digits, so it leaves the reward at chance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_a3po.rollout.tasks import Task, chat_prompt_ids

DIGITS = "0123456789"


def build_tokenizer():
    from megatron_a3po.models.tiny import build_char_tokenizer

    return build_char_tokenizer(DIGITS)


def make_items(n: int, *, seed: int, num_digits: int = 3, exclude=()) -> list[dict]:
    """``n`` random items; questions in ``exclude`` are skipped (drawn again)."""
    rng = random.Random(seed)
    ex = set(exclude)
    out = []
    while len(out) < n:
        d = [rng.randrange(10) for _ in range(num_digits)]
        q = "".join(map(str, d))
        if q not in ex:
            out.append({"question": q, "answer": str(max(d))})
    return out


HOLDOUT_SEED = 20240917


def holdout_items(n: int, *, num_digits: int = 3) -> list[dict]:
    """The held-out eval set: ``n`` distinct questions (a fixed draw), each once, sorted."""
    total = 10 ** num_digits
    if not 0 < n <= total // 2:
        raise ValueError(f"data.synthetic.eval_holdout must be in [1, {total // 2}] for {num_digits} digits, got {n}")
    qs = sorted(f"{i:0{num_digits}d}" for i in random.Random(HOLDOUT_SEED).sample(range(total), n))
    return [{"question": q, "answer": max(q)} for q in qs]


def write_datasets(data_dir, *, seed: int, num_prompts: int = 10000, num_digits: int = 3,
                   eval_holdout: int = 0) -> tuple[Path, Path | None]:
    """Write train.jsonl (and eval.jsonl, the held-out set, when ``eval_holdout``) under ``data_dir``."""
    data_dir = Path(data_dir)
    held = holdout_items(eval_holdout, num_digits=num_digits) if eval_holdout else []
    train = write_jsonl(data_dir / "train.jsonl", make_items(num_prompts, seed=seed, num_digits=num_digits,
                                                             exclude=[x["question"] for x in held]))
    return train, (write_jsonl(data_dir / "eval.jsonl", held) if held else None)


def write_jsonl(path, items) -> Path:
    from megatron_a3po.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in items))
    return path


def reward(response_text: str, rec: dict) -> float:
    """1.0 iff the response (special tokens removed) is exactly the answer digit."""
    return 1.0 if response_text.strip() == str(rec["answer"]).strip() else 0.0


def build_prompt(rec: dict, tokenizer) -> list[int]:
    return chat_prompt_ids(tokenizer, rec["question"])



def warm_start_pairs(n: int, *, seed: int, num_digits: int = 3) -> list[tuple[str, str]]:
    """(question, response) pairs whose responses are random digits: format only, no task signal."""
    rng = random.Random(seed)
    items = make_items(n, seed=seed + 1, num_digits=num_digits)
    return [(x["question"], DIGITS[rng.randrange(10)]) for x in items]


TASK = Task(name="synthetic", fields=("question", "answer"), build_prompt=build_prompt, reward=reward,
            write_datasets=write_datasets, warm_start_pairs=warm_start_pairs)
