"""Checks that run before any process starts or any weight is loaded; each error names the knob."""

from __future__ import annotations

from pathlib import Path
from megatron_a3po.errors import A3POError


class PreflightError(A3POError, ValueError):
    pass


WANDB_HINT = "pip install 'megatron-a3po[wandb]' (or remove logging.wandb)"


def _arch(recipe) -> dict:
    """The recipe's model as the checkpoint's state.json records it (HF config names; see
    trainer.checkpoint.ARCH_FIELDS), read through the one reader, ``models.arch_of_model_cfg``."""
    a = _model_arch(recipe)
    return {"model_type": a.family, "vocab_size": a.vocab_size or None, "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_layers,
            "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
            "tie_word_embeddings": a.tie_embeddings, "source": a.source}


def _model_arch(recipe):
    from megatron_a3po.models import UnsupportedModel, arch_of_model_cfg

    try:
        return arch_of_model_cfg(recipe.model)
    except UnsupportedModel as e:
        raise PreflightError(str(e)) from None


def check_layout(recipe) -> None:
    """The one layout validator (megatron_a3po.models.layout) on the recipe's model and layout."""
    from megatron_a3po.models import LayoutError, check_layout as check

    p, r, t = recipe.parallel, recipe.rollout, recipe.trainer
    try:
        check(_model_arch(recipe), tp=p.tp, pp=p.pp, dp=p.dp, batch_seqs=r.batch_prompts * r.n_samples,
              n_minibatches=t.ppo_n_minibatches)
    except LayoutError as e:
        raise PreflightError(str(e)) from None


def check_engines(urls: list[str], timeout: float = 5.0, router_url: str | None = None) -> None:
    """Every engine answers ``GET /model_info`` (a liveness check: SGLang's /health is a generation, which
    a fleet left paused by a crashed trainer fails until the trainer's first weight update continues it);
    the router answers ``GET /workers`` (its own /health says 200 with no live worker)."""
    import httpx

    from megatron_a3po.platform.keys import auth_headers

    for u, path in [(u, "/model_info") for u in urls] + ([(router_url, "/workers")] if router_url else []):
        key = "rollout.router_url" if path == "/workers" else "rollout.engine_urls"
        try:
            r = httpx.get(u.rstrip("/") + path, timeout=timeout, headers=auth_headers())
        except httpx.HTTPError as e:
            raise PreflightError(f"{key}: {u} unreachable ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise PreflightError(f"{key}: {u}{path} answered HTTP {r.status_code}")


def preflight(recipe) -> None:
    check_layout(recipe)
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
    if recipe.logging.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise PreflightError(f"logging.wandb is set but wandb is not installed: {WANDB_HINT}")
    if recipe.rollout.engine_urls or recipe.rollout.router_url:
        check_engines(list(recipe.rollout.engine_urls), router_url=recipe.rollout.router_url)
