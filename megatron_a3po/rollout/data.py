"""Prompt datasets: local jsonl / json / parquet files loaded with ``datasets``.

``load_records(path, required_fields)`` checks a jsonl file line by line first, so a malformed line is
reported as ``file:line: reason``; a missing field names the file, the row and the field.
``PromptSet`` holds the records and their prompt ids for a task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    pass


def _check_jsonl(path: Path, required: tuple[str, ...]):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for k in required:
                if k not in obj:
                    raise DataError(f"{path}:{lineno}: missing field {k!r}")


def load_records(path, required: tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            _check_jsonl(path, required)
        kind = "json"
    elif suffix == ".parquet":
        kind = "parquet"
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r} (expected .jsonl, .json or .parquet)")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot load with datasets: {e}") from e
    for k in required:
        if k not in ds.column_names:
            raise DataError(f"{path}: missing field {k!r} (columns: {ds.column_names})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    for i, r in enumerate(rows):
        for k in required:
            if r.get(k) is None:
                raise DataError(f"{path}: row {i + 1}: field {k!r} is null")
    return rows


@dataclass
class Prompt:
    index: int  # position in the dataset
    prompt_ids: list[int]
    record: dict


def load_prompts(path, task, tokenizer, limit: int | None = None) -> list[Prompt]:
    """Records of ``path`` turned into prompts by ``task`` (a Task or a task name)."""
    if isinstance(task, str):
        from megatron_a3po.rollout.tasks import get_task

        task = get_task(task)
    recs = load_records(path, task.fields, limit)
    return [Prompt(i, task.build_prompt(r, tokenizer), r) for i, r in enumerate(recs)]
