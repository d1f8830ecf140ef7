"""Prompt datasets: local files, local dataset directories or hub datasets, all loaded with ``datasets``.

A *data spec* (recipe ``data.train_path`` / ``data.eval_path``) is either a string, or a mapping
(``DataSource``) with these keys:

    path          a local .jsonl / .json / .parquet file; a local directory ``datasets`` can load (a hub-style
                  copy with a README ``configs:`` section, a folder of data files named by split, or a
                  ``save_to_disk`` directory); or a hub id such as ``openai/gsm8k`` (read from the hub, or
                  from the local cache with ``HF_DATASETS_OFFLINE=1``)
    name          the dataset config (``main`` for GSM8K); not used for a single file
    split         ``train`` (default), ``test``, ...; not used for a single file (the file is the split)
    question_key  the column holding the task's ``question`` field (default ``question``)
    answer_key    the column holding the task's ``answer`` field (default ``answer``)

A string is ``{path: <string>}``. Records come back with the task's field names (the mapped columns are
renamed; other columns are kept). Errors name the recipe key (``data.train_path.split: ...``); a jsonl
file is checked line by line first, so a malformed line is reported as ``file:line: reason``.
``load_prompts`` turns the records into ``Prompt``s for a task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from megatron_a3po.errors import A3POError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(A3POError, ValueError):
    pass


@dataclass(frozen=True)
class DataSource:
    path: str
    name: str | None = None
    split: str = "train"
    question_key: str = "question"
    answer_key: str = "answer"

    @classmethod
    def of(cls, spec) -> "DataSource":
        """A DataSource from a path string, a mapping, or any object with these attributes (the recipe's)."""
        if isinstance(spec, DataSource):
            return spec
        if isinstance(spec, (str, Path)):
            return cls(path=str(spec))
        if isinstance(spec, dict):
            return cls(**spec)
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls) if hasattr(spec, f.name)})

    def column_map(self) -> dict[str, str]:
        """task field -> dataset column."""
        return {"question": self.question_key, "answer": self.answer_key}


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


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) in (1, 2) and all(parts) and not s.startswith((".", "~")) and "\\" not in s


def _load_dataset(src: DataSource, key: str, cols: dict[str, str]):
    """The ``datasets.Dataset`` of ``src`` (one split)."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(src.path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise DataError(f"{key}.path: {p}: unsupported data format {suffix!r} (expected .jsonl, .json or "
                            ".parquet, a dataset directory or a hub id)")
        if suffix == ".jsonl":
            _check_jsonl(p, tuple(cols.values()))
        try:
            return datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(p),
                                         split="train")
        except Exception as e:
            raise DataError(f"{key}.path: {p}: cannot load with datasets: {e}") from e
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))  # a save_to_disk directory
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{key}.split: split {src.split!r} not in {p} (splits: {sorted(ds)})")
            ds = ds[src.split]
        return ds
    if not p.exists() and not _looks_like_hub_id(src.path):
        raise DataError(f"{key}.path: {src.path} does not exist (and is not a hub id like openai/gsm8k)")
    where = str(p) if p.exists() else src.path
    try:
        return datasets.load_dataset(where, src.name, split=src.split)
    except ValueError as e:
        msg = str(e)
        if "BuilderConfig" in msg or "config name" in msg.lower():
            hint = "; set it to null for a directory of plain data files" if p.exists() else ""
            raise DataError(f"{key}.name: {src.name!r}: {msg}{hint}") from None
        if "split" in msg.lower():
            raise DataError(f"{key}.split: {src.split!r}: {msg}") from None
        raise DataError(f"{key}: {where}: cannot load with datasets: {msg}") from e
    except FileNotFoundError as e:
        raise DataError(f"{key}.path: {where}: not a local file or directory, and not found on the hub "
                        f"({e})") from None
    except ConnectionError as e:
        raise DataError(f"{key}.path: {where} is not a local file or directory, and the hub cannot be "
                        f"reached ({e}); point {key}.path at a local copy") from None
    except Exception as e:
        raise DataError(f"{key}: {where}: cannot load with datasets: {type(e).__name__}: {e}") from e


def load_records(spec, required: tuple[str, ...] = (), limit: int | None = None, *, key: str = "data") -> list[dict]:
    """Records of the data spec ``spec`` (see the module docstring), with the task's ``required`` fields
    under their own names; the first ``limit`` records only, if set. ``key`` names the spec in errors."""
    src = DataSource.of(spec)
    cmap = src.column_map()
    cols = {f: cmap.get(f, f) for f in required}
    p = Path(src.path).expanduser()
    if p.suffix.lower() in FILE_SUFFIXES and not p.exists():
        raise DataError(f"{key}.path: data file {p} does not exist")
    ds = _load_dataset(src, key, cols)
    for f, c in cols.items():
        if c not in ds.column_names:
            which = {"question": "question_key", "answer": "answer_key"}.get(f)
            where = f"{key}.{which}" if which else key
            raise DataError(f"{where}: column {c!r} (the task's field {f!r}) is not in {src.path} "
                            f"(columns: {ds.column_names})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    out = []
    for i, r in enumerate(rows):
        for f, c in cols.items():
            if r.get(c) is None:
                raise DataError(f"{key}: {src.path}: row {i + 1}: field {c!r} is null")
        rec = {k: v for k, v in r.items() if k not in cols.values()}
        rec.update({f: r[c] for f, c in cols.items()})
        out.append(rec)
    return out


@dataclass
class Prompt:
    index: int  # position in the dataset
    prompt_ids: list[int]
    record: dict


def load_prompts(spec, task, tokenizer, limit: int | None = None, *, key: str = "data") -> list[Prompt]:
    """Records of the data spec ``spec`` turned into prompts by ``task`` (a Task or a task name)."""
    if isinstance(task, str):
        from megatron_a3po.rollout.tasks import get_task

        task = get_task(task)
    recs = load_records(spec, task.fields, limit, key=key)
    return [Prompt(i, task.build_prompt(r, tokenizer), r) for i, r in enumerate(recs)]
