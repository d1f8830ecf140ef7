"""megatron-core on a CPU (gloo): every patch in one place, applied only when no CUDA device exists.

megatron-core 0.16 runs on CPU except for a few hard-coded CUDA calls. Rather than patching torch
globally, each affected megatron module gets a *module-local* stand-in for its ``torch`` name
(``_TorchOnCPU``): identical to torch except that

  * ``torch.cuda.current_device()`` returns ``torch.device("cpu")``, ``torch.cuda.synchronize()`` is a
    no-op, ``torch.cuda.is_available()`` is False;
  * tensor factories (``zeros``, ``empty``, ``ones``, ``tensor``, ``full``, ``arange``) map
    ``device="cuda"`` to the CPU.

Patched modules, and why:

  megatron.core.pipeline_parallel.schedules       ``total_num_tokens = torch.zeros(..., device="cuda")``
  megatron.core.pipeline_parallel.p2p_communication  shape buffers on ``torch.cuda.current_device()``,
                                                  ``torch.cuda.synchronize()`` after batched p2p
  megatron.core.models.common.embeddings.rotary_pos_embedding  ``inv_freq.to(torch.cuda.current_device())``
  megatron.core.dist_checkpointing.strategies.async_utils / filesystem_async  ``torch.cuda.synchronize()``
                                                  and liveness tensors on the current CUDA device
  megatron.core.dist_checkpointing.strategies.state_dict_saver  the save's failure flag is all-reduced
                                                  as a tensor on ``torch.cuda.current_device()``

One method is wrapped instead (its CUDA call is a Tensor method, not a ``torch.`` name):

  LanguageModule.setup_embeddings_and_output_layer  ``weight.data.cuda()`` before the all-reduce that
                                                  syncs tied embeddings between the first and last
                                                  pipeline stage: ``Tensor.cuda`` is the identity
                                                  for the duration of that call only

Two more pieces live beside this module: ``SDPACoreAttention`` (attention.py) replaces
``DotProductAttention`` in the local layer spec (it allocates through ``get_global_memory_buffer()`` on
CUDA and forks the CUDA RNG tracker), and ``seed_everything`` (``model_parallel_cuda_manual_seed``
needs CUDA; on CPU the CPU generator is seeded instead).

``apply_cpu_patches()`` is idempotent and does nothing when CUDA is available. The torch-AdamW ``step``
fix is needed on a GPU without TE/apex too: ``apply_optimizer_fixes()`` (init_distributed, every device).
"""

from __future__ import annotations

import importlib
import types

import torch

PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "empty", "ones", "tensor", "full", "arange", "zeros_like", "empty_like")
_applied: list[str] = []


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int):
        return torch.device("cpu")
    d = torch.device(dev)
    return torch.device("cpu") if d.type == "cuda" else d


class _CudaOnCPU:
    """``torch.cuda`` as the patched modules see it on a CPU machine."""

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = f"{fn.__name__} with device='cuda' mapped to the CPU (megatron_a3po.platform.cpu)"
    return wrapped


class _TorchOnCPU(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCPU()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


TORCH_ON_CPU = _TorchOnCPU()


def _scoped_tensor_method(name: str, replacement):
    """A wrapper that swaps ``torch.Tensor.<name>`` for ``replacement(original)`` during one call."""

    def wrap(fn):
        def wrapped(*args, **kwargs):
            saved = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, replacement(saved))
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(torch.Tensor, name, saved)

        wrapped.__wrapped__ = fn
        wrapped.__name__ = getattr(fn, "__name__", "wrapped")
        wrapped._a3po_cpu_patch = True
        return wrapped

    return wrap


def _cuda_identity(_orig):
    return lambda t, *a, **k: t


def _cuda_type_names(orig):
    """``t.type()`` (no argument) of a CPU tensor names its CUDA twin: 'torch.FloatTensor' reads
    'torch.cuda.FloatTensor'. With an argument it converts as usual."""

    def type_(t, *a, **k):
        s = orig(t, *a, **k)
        if not a and not k and t.device.type == "cpu" and s.startswith("torch.") and not s.startswith("torch.cuda."):
            return "torch.cuda." + s[len("torch."):]
        return s

    return type_


_tensor_cuda_is_identity = _scoped_tensor_method("cuda", _cuda_identity)
_tensor_type_reads_cuda = _scoped_tensor_method("type", _cuda_type_names)

def _keep_torch_adam_step(fn):
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the inner
    optimizer's per-parameter state from the loaded tensors. torch's AdamW (used when neither TE nor
    apex is installed, as on every CPU machine) also keeps a ``step`` there, which the checkpoint
    formats carry in the param groups instead (``load_state_dict`` restores it), so the copy fails with
    KeyError 'step'. The wrapper leaves ``step`` out of that copy; the rest is megatron's code."""

    def wrapped(self, model_param, tensors):
        if "step" in tensors or getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            return fn(self, model_param, tensors)
        gi, go = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[gi]["params"][go]]
        step = state.pop("step", None)
        try:
            return fn(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    wrapped.__wrapped__ = fn
    wrapped._a3po_cpu_patch = True
    return wrapped


# (module, attribute path in it, wrapper): "Class.method" wraps the method on the class; "function"
# rebinds the module-level name (only that module's callers see the wrapper)
WRAPPED_METHODS = (
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", _tensor_cuda_is_identity),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__", _tensor_type_reads_cuda),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__", _tensor_type_reads_cuda),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", _tensor_type_reads_cuda),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
     _tensor_cuda_is_identity),
)
# needed on every device: megatron falls back to torch's AdamW wherever neither TE nor apex is installed
OPTIMIZER_FIXES = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states",
     _keep_torch_adam_step),
)


def apply_optimizer_fixes() -> list[str]:
    """The torch-AdamW ``step`` fix (``_keep_torch_adam_step``), on CPU and GPU alike (idempotent)."""
    return _wrap(OPTIMIZER_FIXES)


def apply_cpu_patches(force: bool = False) -> list[str]:
    """Point the ``torch`` name of each module in PATCHED_MODULES at the CPU stand-in (no CUDA only).

    Returns the names of the modules patched so far. ``force`` patches even with CUDA (tests only).
    """
    if torch.cuda.is_available() and not force:
        return []
    for name in PATCHED_MODULES:
        if name in _applied:
            continue
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module absent in this megatron-core version needs no patch
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = TORCH_ON_CPU
        _applied.append(name)
    _wrap(WRAPPED_METHODS + OPTIMIZER_FIXES)
    return list(_applied)


def _wrap(table) -> list[str]:
    for modname, path, wrapper in table:
        key = f"{modname}.{path}"
        if key in _applied:
            continue
        try:
            owner = importlib.import_module(modname)
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            fn = getattr(owner, attr)
        except (ImportError, AttributeError):  # absent in this megatron-core version: nothing to wrap
            continue
        if not getattr(fn, "_a3po_cpu_patch", False):
            setattr(owner, attr, wrapper(fn))
        _applied.append(key)
    return list(_applied)
