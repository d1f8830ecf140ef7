"""Checks that run before any process starts or any weight is loaded; each error names the knob."""

from __future__ import annotations

import json
from pathlib import Path


class PreflightError(ValueError):
    pass


def _arch(recipe) -> dict:
    mc = recipe.model
    if mc.tiny is not None:
        t = mc.tiny
        return {"num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "num_hidden_layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "tie_word_embeddings": t.tie_word_embeddings,
                "model_type": "qwen2", "source": "model.tiny"}
    if mc.hf_path is not None:
        cfg = Path(mc.hf_path) / "config.json"
        if not cfg.exists():
            raise PreflightError(f"model.hf_path={mc.hf_path}: {cfg} not found")
    else:
        root = Path(mc.mcore_path)
        if not root.exists():
            raise PreflightError(f"model.mcore_path={mc.mcore_path}: directory not found")
        cfg = root / "hf_config" / "config.json"
        if not cfg.exists():
            raise PreflightError(f"model.mcore_path={mc.mcore_path}: {cfg} not found (convert with tools.convert_ckpt)")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise PreflightError(f"{cfg}: not valid JSON ({e})") from None
    d.setdefault("num_key_value_heads", d.get("num_attention_heads"))
    d["source"] = str(cfg)
    return d


def check_layout(arch: dict, tp: int, pp: int) -> None:
    nh, nkv, nl = arch["num_attention_heads"], arch["num_key_value_heads"], arch["num_hidden_layers"]
    src = arch.get("source", "model")
    if nh % tp:
        raise PreflightError(f"parallel.tp={tp} does not divide num_attention_heads={nh} ({src})")
    if nkv % tp:  # megatron-core shards whole query groups
        raise PreflightError(f"parallel.tp={tp} does not divide num_key_value_heads={nkv} ({src})")
    if nl % pp:
        raise PreflightError(f"parallel.pp={pp} does not divide num_hidden_layers={nl} ({src})")


def check_engines(urls: list[str], timeout: float = 5.0) -> None:
    import httpx

    for u in urls:
        try:
            r = httpx.get(u.rstrip("/") + "/health", timeout=timeout)
        except httpx.HTTPError as e:
            raise PreflightError(f"rollout.engine_urls: {u} unreachable ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise PreflightError(f"rollout.engine_urls: {u}/health answered HTTP {r.status_code}")


def preflight(recipe) -> None:
    check_layout(_arch(recipe), recipe.parallel.tp, recipe.parallel.pp)
    d = recipe.data
    from megatron_a3po.rollout.data import DataError, load_records
    from megatron_a3po.rollout.tasks import get_task

    try:
        task = get_task(d.task)
    except ValueError as e:
        raise PreflightError(f"data.task: {e}") from None
    for key in ("train_path", "eval_path"):
        spec = getattr(d, key)
        if spec is not None:
            try:  # errors name the key: data.train_path.split: ...
                load_records(spec, task.fields, key=f"data.{key}")
            except DataError as e:
                raise PreflightError(str(e)) from None
    if d.train_path is None and task.write_datasets is None:
        raise PreflightError(f"data.train_path is required for data.task={d.task}")
    if recipe.trainer.resume and recipe.trainer.save_dir and not Path(recipe.trainer.save_dir).exists():
        raise PreflightError(f"trainer.resume=true but trainer.save_dir={recipe.trainer.save_dir} does not exist")
    urls = list(recipe.rollout.engine_urls) + ([recipe.rollout.router_url] if recipe.rollout.router_url else [])
    if urls:
        check_engines(urls)
