"""TEST SUPPORT ONLY: a stand-in for SGLang's kernel package (``sgl_kernel``) on a CPU without its kernels.

No PyPI wheel of ``sgl-kernel`` / ``sglang-kernel`` ships the CPU ops, and there is no sdist. SGLang
0.5.23 with ``SGLANG_USE_CPU_ENGINE=1`` (``--device cpu --attention-backend torch_native``) reaches one
op of this package on a dense model: ``assign_req_to_token_pool_cpu``, called on every prefill
(``sglang/srt/mem_cache/allocation.py``). This module implements that op with plain torch indexing and
nothing else: every other name imports as a function that raises ``NotInStandIn`` when called, so a code path that needs a real kernel fails
loudly instead of running something made up. ``scripts/sglang_env.sh`` copies it into SGLang's own
virtual environment (never into the project's); it is not a product and not used on GPU machines, where
SGLang's real kernel package is installed.
"""

import torch

__version__ = "0.0.0+megatron-a3po-test-standin"
STANDIN = True  # lets a test or a log tell this package from the real one

_IMPLEMENTED = ("assign_req_to_token_pool_cpu",)


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i (row ``req_pool_indices[i]`` of ``req_to_token``, columns ``[start_offset[i],
    end_offset[i])``): ``req_to_token[row, s:e] = out_cache_loc[off:off + e - s]``, ``off`` advancing by
    ``e - s`` from 0 over the requests in order. In place; ``pool_len`` (the row length) bounds ``e``."""
    rows = req_pool_indices.tolist()
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    if not len(rows) == len(starts) == len(ends):
        raise ValueError(f"assign_req_to_token_pool_cpu: {len(rows)} rows, {len(starts)} starts, {len(ends)} ends")
    off = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n < 0 or e > pool_len or off + n > out_cache_loc.numel():
            raise ValueError(f"assign_req_to_token_pool_cpu: row {row} span [{s}, {e}) with pool_len {pool_len} "
                             f"and {out_cache_loc.numel()} cache locations (offset {off})")
        req_to_token[row, s:e] = out_cache_loc[off:off + n].to(req_to_token.dtype)
        off += n


class NotInStandIn(NotImplementedError):
    pass


def __getattr__(name: str):
    """SGLang imports some kernels at module level (``from sgl_kernel import copy_all_layer_kv_cache_cpu``)
    without calling them on this path: the import succeeds, a call raises ``NotInStandIn``."""
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotInStandIn(
            f"sgl_kernel.{name} was called, but the megatron-a3po test stand-in for sgl_kernel implements only "
            f"{', '.join(_IMPLEMENTED)} (tests/support/sgl_kernel_standin): this SGLang code path needs the real "
            "kernel package")

    missing.__name__ = missing.__qualname__ = name
    return missing
