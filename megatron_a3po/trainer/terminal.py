"""What the main job prints: known library fallback warnings as one line, a progress bar that never
splits a log line.

* ``install_warning_filter()`` (before megatron-core is imported) holds back the warnings megatron-core
  gives when optional accelerators are absent (Transformer Engine / Apex not installed -> torch
  fallbacks), its deprecation of the ``full`` cuda-graph scope, its fp32 distributed optimizer's
  read of ``.grad`` on shard views, and torch's deprecation of the collectives that optimizer calls; ``known_warnings_line()`` then says
  in one line what was held back. Every other warning is shown as usual.
* ``progress(start, total)``: a tqdm bar on a terminal only (stderr is a TTY); log records are then
  written above the bar (tqdm's logging redirection). Redirected to a file or a pipe there is no bar,
  and every step writes one whole log line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings

# (pattern on the message, short description) for warnings issued from megatron-core's own files
KNOWN_WARNINGS = (
    (re.compile(r"Transformer Engine and Apex are not installed"), "Transformer Engine and Apex not installed"),
    (re.compile(r"Apex is not installed"), "Apex not installed"),
    (re.compile(r"Transformer Engine is not installed|TE is not installed"), "Transformer Engine not installed"),
    (re.compile(r"full scope is deprecated"), "cuda_graph_scope 'full' deprecated"),
    # the fp32 distributed optimizer keeps its shards as views of the parameters, and zero_grad reads them
    (re.compile(r"\.grad attribute of a Tensor that is not a leaf Tensor"),
     "distributed optimizer reads .grad of fp32 shard views"),
)
# torch deprecations of the collectives megatron-core's distributed optimizer calls (issued from torch's
# own c10d wrapper, so matched by message and that file)
KNOWN_TORCH_WARNINGS = (
    (re.compile(r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
     "torch deprecates reduce_scatter_tensor / all_gather_into_tensor"),
)

_held: dict[str, int] = {}
_reported: dict[str, int] = {}
_orig_showwarning = None


def _is_known(message, filename: str) -> str | None:
    fn, text = str(filename).replace("\\", "/"), str(message)
    table = KNOWN_WARNINGS if "megatron" in fn else KNOWN_TORCH_WARNINGS if fn.endswith(
        "torch/distributed/c10d_logger.py") else ()
    for pat, what in table:
        if pat.search(text):
            return what
    return None


def _showwarning(message, category, filename, lineno, file=None, line=None):
    what = _is_known(message, filename)
    if what is not None:
        _held[what] = _held.get(what, 0) + 1
        return
    _orig_showwarning(message, category, filename, lineno, file, line)


def install_warning_filter() -> None:
    """Hold back megatron-core's known fallback warnings (idempotent; ``A3PO_ALL_WARNINGS=1``: show all)."""
    global _orig_showwarning
    if _orig_showwarning is not None or os.environ.get("A3PO_ALL_WARNINGS") == "1":
        return
    _orig_showwarning = warnings.showwarning
    warnings.showwarning = _showwarning


def known_warnings_line() -> str | None:
    """One line naming the known warnings held back since the last call (None if there were none)."""
    new = {k: v - _reported.get(k, 0) for k, v in _held.items() if v > _reported.get(k, 0)}
    if not new:
        return None
    _reported.update(_held)
    parts = ", ".join(f"{k} (x{n})" if n > 1 else k for k, n in new.items())
    return (f"megatron-core fallbacks, expected on this machine: {parts}; torch implementations are used "
            "(A3PO_ALL_WARNINGS=1 shows the full warnings)")


def quiet_library_progress() -> None:
    """No progress bars from transformers / huggingface_hub / datasets (they would split log lines)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) and os.environ.get("A3PO_NO_PROGRESS") != "1"


class Progress:
    """A tqdm bar on a terminal with log records redirected above it; nothing when redirected."""

    def __init__(self, start: int, total: int, desc: str = "A-3PO"):
        self.bar = None
        self._redirect = None
        if on_terminal():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
