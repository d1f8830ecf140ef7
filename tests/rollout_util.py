"""Shared helpers for the rollout/engine tests: tiny model dirs, engine processes, a toy task."""

from __future__ import annotations

import json
from pathlib import Path

CHARS = "0123456789+-=* abcdefghijklmnopqrstuvwxyz"


def tokenizer():
    from megatron_a3po.models.tiny import build_char_tokenizer

    return build_char_tokenizer(CHARS)


def model_dirs(root: Path, n: int = 2, family: str = "qwen2", **config) -> list[str]:
    """``n`` tiny models of one architecture with different random weights (seed i); ``config``
    overrides fields of the HF config (e.g. max_position_embeddings)."""
    from megatron_a3po.models.tiny import save_tiny_hf_model

    tok = tokenizer()
    return [str(save_tiny_hf_model(root / f"{family}-w{i}", family, seed=i, tokenizer=tok, **config))
            for i in range(n)]


def hf_tensors(d) -> dict:
    """An HF directory's tensors, read with safetensors (independent of the engine and the converter)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def toy_prompts(n: int):
    from megatron_a3po.rollout.data import Prompt

    tok = tokenizer()
    return [Prompt(i, tok(f"{i % 50}+{i % 7}=")["input_ids"], {"sum": str(i % 50 + i % 7)}) for i in range(n)]


def toy_reward(text: str, rec: dict) -> float:
    return float(rec["sum"] in text)


def picky_reward(text: str, rec: dict) -> float:
    """1.0, except for the text "boom", on which it raises (a reward bug)."""
    if text == "boom":
        raise ValueError("boom")
    return 1.0


def toy_task():
    from megatron_a3po.rollout.tasks import Task

    # module-level reward: rewards run in worker processes (rollout/rewards.py), so it must pickle
    return Task("toy", ("sum",), None, toy_reward)


def read_version_logs(paths) -> dict[str, dict]:
    recs = {}
    for p in paths:
        if p and Path(p).exists():
            for line in Path(p).read_text().splitlines():
                r = json.loads(line)
                recs[r["rid"]] = r
    return recs


def check_versions_against_logs(samples, logs: dict[str, dict]):
    """Each sample's tokens and per-token versions equal what the engines logged for its segments."""
    for s in samples:
        ids, vers = [], []
        for rid in s.rids:
            assert rid in logs, f"sample g{s.group_id}/{s.sample_index}: rid {rid} not in any engine log"
            ids += logs[rid]["output_ids"]
            vers += [int(v) for v in logs[rid]["versions"]]
        assert ids == s.response_ids, f"sample g{s.group_id}/{s.sample_index}: tokens differ from the engine log"
        assert vers == s.versions, f"sample g{s.group_id}/{s.sample_index}: versions differ from the engine log"
