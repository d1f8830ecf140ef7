"""The CPU demo's task: name the largest of a few digits.

Prompt: the digits (e.g. ``381``) through the character tokenizer's chat template; the correct
response is the largest digit followed by end-of-sequence (``8<eos>``). Reward 1 for exactly that,
else 0, so a policy that answers with a uniformly random digit scores ~0.1. A tiny transformer can
learn it by RL on two CPU cores in a few minutes, which makes the reward curve an honest signal.

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


def make_items(n: int, *, seed: int, num_digits: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = [rng.randrange(10) for _ in range(num_digits)]
        out.append({"question": "".join(map(str, d)), "answer": str(max(d))})
    return out


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


TASK = Task(name="synthetic", fields=("question", "answer"), build_prompt=build_prompt, reward=reward)


def warm_start_pairs(n: int, *, seed: int, num_digits: int = 3) -> list[tuple[str, str]]:
    """(question, response) pairs whose responses are random digits: format only, no task signal."""
    rng = random.Random(seed)
    items = make_items(n, seed=seed + 1, num_digits=num_digits)
    return [(x["question"], DIGITS[rng.randrange(10)]) for x in items]
