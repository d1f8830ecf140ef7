"""Data specs: one spec type for a local file, a hub-style dataset directory (the hub code path, offline)
and the GSM8K files in ../shared/data; the same records whichever way; bad specs name their key."""

import json
import os
from pathlib import Path

import pytest

from megatron_a3po.rollout.data import DataError, load_records

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
pytestmark = pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(),
                                reason=f"{GSM8K} not present (../shared beside the checkout)")
FIELDS = ("question", "answer")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))


def _hub_style_copy(root: Path, rows_by_split: dict, rename=None) -> Path:
    """A directory laid out as the hub's openai/gsm8k: a README with a ``configs:`` section and one
    parquet file per split under ``main/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "gsm8k"
    (d / "main").mkdir(parents=True)
    lines = ["---", "configs:", "- config_name: main", "  data_files:"]
    for split, rows in rows_by_split.items():
        cols = {(rename or {}).get(k, k): [r[k] for r in rows] for k in FIELDS}
        pq.write_table(pa.table(cols), d / "main" / f"{split}-00000-of-00001.parquet")
        lines += [f"  - split: {split}", f"    path: main/{split}-00000-of-00001.parquet"]
    (d / "README.md").write_text("\n".join(lines + ["---", "", "GSM8K, as laid out on the hub."]) + "\n")
    return d


def _jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_gsm8k_from_a_hub_style_directory_and_from_the_shared_files_gives_the_same_records(tmp_path):
    test_rows, train_rows = _jsonl(GSM8K / "test.jsonl"), _jsonl(GSM8K / "train.jsonl")[:500]
    hub = _hub_style_copy(tmp_path, {"train": train_rows, "test": test_rows})
    from_hub = load_records({"path": str(hub), "name": "main", "split": "test"}, FIELDS)
    from_file = load_records({"path": str(GSM8K / "test.jsonl")}, FIELDS)
    from_dir = load_records({"path": str(GSM8K), "split": "test"}, FIELDS)  # split named by file
    assert from_hub == from_file == from_dir == test_rows
    assert load_records({"path": str(hub), "name": "main", "split": "train"}, FIELDS) == train_rows


def test_column_names_are_mapped_to_the_task_fields(tmp_path):
    rows = _jsonl(GSM8K / "test.jsonl")[:20]
    hub = _hub_style_copy(tmp_path, {"test": rows}, rename={"question": "problem", "answer": "solution"})
    got = load_records({"path": str(hub), "name": "main", "split": "test", "question_key": "problem",
                        "answer_key": "solution"}, FIELDS)
    assert got == rows


def test_bad_specs_name_the_key(tmp_path):
    rows = _jsonl(GSM8K / "test.jsonl")[:5]
    hub = _hub_style_copy(tmp_path, {"test": rows}, rename={"question": "problem"})
    with pytest.raises(DataError, match=r"^data\.eval_path\.question_key: column 'question'.*columns"):
        load_records({"path": str(hub), "name": "main", "split": "test"}, FIELDS, key="data.eval_path")
    with pytest.raises(DataError, match=r"^data\.eval_path\.split: 'tset'"):
        load_records({"path": str(hub), "name": "main", "split": "tset", "question_key": "problem"}, FIELDS,
                     key="data.eval_path")
    with pytest.raises(DataError, match=r"^data\.train_path\.name: 'socratic'"):
        load_records({"path": str(hub), "name": "socratic", "split": "test"}, FIELDS, key="data.train_path")
    with pytest.raises(DataError, match=r"^data\.train_path\.path: .*does not exist"):
        load_records(str(tmp_path / "nope.jsonl"), FIELDS, key="data.train_path")
    # a hub id with no network and nothing cached: says so, and how to point at a local copy
    with pytest.raises(DataError, match=r"^data\.train_path\.path: openai/gsm8k .*local copy"):
        load_records({"path": "openai/gsm8k", "name": "main"}, FIELDS, key="data.train_path")


def test_recipe_spec_reaches_the_loader(tmp_path):
    from megatron_a3po.config import load_recipe

    r = load_recipe("qwen2_5_1_5b_gsm8k", [f"data.eval_path.path={GSM8K}", "data.eval_path.name=null"])
    assert r.data.eval_path.split == "test" and r.data.train_path.path == "openai/gsm8k"
    assert len(load_records(r.data.eval_path, FIELDS, key="data.eval_path")) == 1319
    r = load_recipe("qwen2_5_1_5b_gsm8k", [f"data.train_path={GSM8K / 'train.jsonl'}"])  # a plain string
    assert load_records(r.data.train_path, FIELDS, limit=3) == _jsonl(GSM8K / "train.jsonl")[:3]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
