"""The one layout validator: which parallel layouts a model and a batch allow. Every rule of the model and
the batch is written here once, and every message names the recipe key it is about; the preflight
(megatron_a3po.trainer), the model builder, the converter CLI and the launcher (launch/) all call it. The
rules of a cluster (nodes, GPUs per node, ports, executors) are the launcher's (launch/layout.py).

    layout_errors(arch, tp=, pp=, ...)   every broken rule, as messages (the launcher lists them all)
    check_layout(arch, tp=, pp=, ...)    the same, raised as one ``LayoutError``

Rules (megatron-core's): TP divides the attention heads and the KV heads (whole query groups per rank),
PP divides the layers, an engine's TP divides the heads, and each PPO minibatch holds at least one
sequence per data-parallel rank.
"""

from __future__ import annotations

from megatron_a3po.errors import A3POError


class LayoutError(A3POError, ValueError):
    pass


def layout_errors(arch, *, tp: int, pp: int, dp: int | None = None, engine_tp: int | None = None,
                  batch_seqs: int | None = None, n_minibatches: int | None = None,
                  keys: dict[str, str] | None = None) -> list[str]:
    """Messages for every rule ``arch`` (a ``models.Arch``) and the layout break; [] if none.

    ``keys`` renames the knobs in the messages (the converter CLI says ``--tp`` for ``parallel.tp``)."""
    k = {"tp": "parallel.tp", "pp": "parallel.pp", "engine_tp": "rollout.engine_tp",
         "batch": "rollout.batch_prompts x rollout.n_samples", "minibatches": "trainer.ppo_n_minibatches",
         **(keys or {})}
    src = f" ({arch.source})" if arch.source else ""
    out = []
    for knob, size, what, n in ((k["tp"], tp, "num_attention_heads", arch.num_heads),
                                (k["tp"], tp, "num_key_value_heads", arch.num_kv_heads),
                                (k["pp"], pp, "num_hidden_layers", arch.num_layers),
                                (k["engine_tp"], engine_tp, "num_attention_heads", arch.num_heads)):
        if size is not None and (size <= 0 or n % size):
            out.append(f"{knob}={size} does not divide {what}={n}{src}")
    if batch_seqs is not None and n_minibatches is not None:
        if batch_seqs % n_minibatches:
            out.append(f"{k['batch']} = {batch_seqs} is not divisible by {k['minibatches']}={n_minibatches}")
        elif dp is not None and batch_seqs // n_minibatches < dp:
            out.append(f"a PPO minibatch holds {batch_seqs // n_minibatches} sequences, fewer than the "
                       f"data-parallel size {dp}: raise rollout.batch_prompts or lower {k['minibatches']}")
    return out


def check_layout(arch, **kw) -> None:
    """``layout_errors``, raised: one ``LayoutError`` whose message lists every broken rule."""
    errors = layout_errors(arch, **kw)
    if errors:
        raise LayoutError("; ".join(errors))
