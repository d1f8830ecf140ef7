"""Task registry: how a dataset record becomes a prompt and how a response is scored.

A task is a module ``megatron_a3po/rollout/tasks/<name>.py`` that defines ``TASK = Task(...)``;
``get_task(name)`` imports it on first use, so adding a task is adding one file (e.g. ``synthetic.py``).

    Task.fields                    record keys the task needs (checked when the data is loaded)
    Task.build_prompt(rec, tok)    -> list[int] prompt token ids
    Task.reward(text, rec)         -> float, the reward of a decoded response for that record; it runs in a
                                   worker process killed at the rollout's reward timeout (rollout/rewards.py),
                                   so it must be a module-level (picklable) function

Optional hooks, declared here (None: the task does not offer it):

    Task.write_datasets(dir, seed=, **data.synthetic) -> (train path, eval path | None)
                                   a generated task writes its own data (then data.train_path may be unset)
    Task.warm_start_pairs(n, seed=) -> [(question, response)]   supervised pairs for trainer.warm_start_steps
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]
    build_prompt: Callable[[dict, Any], list[int]]
    reward: Callable[[str, dict], float]
    write_datasets: Callable[..., tuple[Any, Any]] | None = None
    warm_start_pairs: Callable[..., list[tuple[str, str]]] | None = None


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name or ""):
        raise ValueError(f"task name {name!r} is not a valid module name")
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise ValueError(f"unknown task {name!r}: no module megatron_a3po/rollout/tasks/{name}.py") from None
        raise
    task = getattr(mod, "TASK", None)
    if not isinstance(task, Task):
        raise ValueError(f"megatron_a3po/rollout/tasks/{name}.py must define TASK = Task(...)")
    return register_task(task)


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """``user_text`` through the tokenizer's chat template (generation prompt added) when it has one,
    else the raw text; returns token ids."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(user_text, add_special_tokens=True)["input_ids"])
