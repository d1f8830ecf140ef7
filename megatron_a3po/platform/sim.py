"""A simulated GPU cluster on a CPU-only torch: the real code at a GPU recipe's layout, one rank at a time.

The CPU suite runs on gloo, where every tensor is a CPU tensor, so it cannot see a tensor on the wrong
device, a CPU tensor handed to an NCCL group, or a per-GPU memory peak. This module lets one process play
one rank of a GPU job (global rank r of a world of W, on local GPU r % gpus_per_node) with:

* **CUDA tensors without a GPU.** torch's ``FakeTensorMode`` gives tensors on device "cuda" shapes, dtypes
  and devices but no data. A CPU-only torch has no CUDA device guard, so autograd (which records each
  input's device stream) and ``Tensor.cuda()`` abort; ``SIM_CUDA_SOURCE`` registers torch's own
  ``c10::impl::FakeGuardImpl`` as the CUDA guard and CUDA hooks that report 8 devices. It is compiled
  with g++ against the installed torch's headers (``build_sim_cuda``, cached) and must be loaded before
  ``import torch`` (``LIB_ENV``): torch reads its CUDA hooks once, at import. ``torch.cuda``'s Python API
  still says "no CUDA"; a device mismatch raises ``FakeTensorDeviceMismatchError`` as a GPU raises its
  "Expected all tensors to be on the same device".
* **NCCL-strict process groups.** Backend ``a3po_sim_nccl`` is registered for the cuda device only
  (``Backend.register_backend(..., devices=["cuda"])``) and built on torch's ``FakeProcessGroup``
  (torch.testing._internal.distributed.fake_pg): collectives complete at once, moving no data, as in
  torch's own tracing tools. ``NCCLStrict`` (a dispatch mode under the fake mode) checks every c10d op
  first: a CPU tensor raises the group's own "No backend type associated with device type cpu" (what
  NCCL groups raise); a CUDA tensor must be on this rank's GPU (two ranks of a node on one GPU: NCCL's
  "Duplicate GPU detected"); all-gather / reduce-scatter sizes must agree with the group size.
* **Megatron's CUDA calls** (``torch.cuda.current_device``, streams, events, device properties, the
  CUDA RNG) reach ``SimCuda`` through a module-local ``torch`` stand-in in each megatron.core module, as
  megatron_a3po.platform.cpu does for CPU runs; ours go through megatron_a3po.platform.gpu.
* **What the data would say.** Fake tensors have no values. ``Tensor.item()`` of a tensor computed here
  returns 1 (a plausible count or norm); a bool is the healthy answer (``all(...)`` True, ``any(...)``
  False: no NaN, no overflow); a data-dependent selection (``nonzero``, ``masked_select``) selects every
  element (the most memory). Pipeline stages exchange each micro-batch's shape before
  the tensor (``variable_seq_lengths``); a rank simulated alone receives the shape its schedule passes
  (exact when the simulated micro-batches share one shape, as the simulation's batches do). Object
  collectives pickle nothing here: every peer's object is the one this rank sends, or, on the world
  group, what an earlier simulated rank of the peer's role (pipeline stage, TP rank 0 or not) sent
  (``Transcript``), with each tensor placed on the GPU the peer's pickled CUDA tensor unpickles on
  (the sender's local device).

``activate`` sets this up in a process that loaded the library before torch (``LIB_ENV``); ``begin_rank`` /
``end_rank`` bracket one simulated rank; ``fake_mode()`` is the context the rank's code runs in.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from megatron_a3po.errors import A3POError

BACKEND = "a3po_sim_nccl"
GLOO_BACKEND = "a3po_sim_gloo"
GPU_NAME = "NVIDIA H100 80GB HBM3 (simulated)"
GPU_MEMORY = 81559 * 2**20  # what torch.cuda.get_device_properties reports on an H100 80GB SXM
MAX_LOCAL_GPUS = 8  # c10::impl::kFakeGuardImplMaxDevices

SIM_CUDA_SOURCE = r"""
// A simulated CUDA device for fake tensors on a CPU-only torch (megatron_a3po/platform/sim.py).
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace a3po_sim {
using Guard = c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>;
C10_REGISTER_GUARD_IMPL(CUDA, Guard);

// the class name is the registry key torch looks up ("CUDAHooks")
struct CUDAHooks final : at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void init() const override {}
  c10::DeviceIndex deviceCount() const override { return c10::impl::kFakeGuardImplMaxDevices; }
  int getNumGPUs() const override { return c10::impl::kFakeGuardImplMaxDevices; }
  c10::DeviceIndex current_device() const override { return Guard::getDeviceIndex(); }
  c10::DeviceIndex getCurrentDevice() const override { return Guard::getDeviceIndex(); }
  void setCurrentDevice(c10::DeviceIndex d) const override { Guard::setDeviceIndex(d); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    auto old = Guard::getDeviceIndex(); Guard::setDeviceIndex(d); return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override { return exchangeDevice(d); }
};
}  // namespace a3po_sim
namespace at { C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, a3po_sim::CUDAHooks); }
extern "C" void a3po_sim_set_device(int i) { a3po_sim::Guard::setDeviceIndex(static_cast<c10::DeviceIndex>(i)); }
extern "C" int a3po_sim_get_device() { return a3po_sim::Guard::getDeviceIndex(); }
"""


class SimUnavailable(A3POError, RuntimeError):
    pass


def _torch_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SimUnavailable("torch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def build_sim_cuda(cache_dir: str | Path | None = None) -> Path:
    """Compile SIM_CUDA_SOURCE against the installed torch (once per torch build; g++ needed)."""
    import shutil

    tdir = _torch_dir()
    key = hashlib.sha1((SIM_CUDA_SOURCE + str(tdir) + str((tdir / "version.py").stat().st_mtime)).encode()
                       ).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("A3PO_SIM_CACHE") or Path.home() / ".cache" / "megatron_a3po")
    out = cache / f"simcuda-{key}.so"
    if out.exists():
        return out
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise SimUnavailable("the simulated cluster needs a C++ compiler (g++) to build its CUDA stand-in")
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"simcuda-{key}.cpp"
    src.write_text(SIM_CUDA_SOURCE)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    cmd = [cxx, "-O1", "-w", "-shared", "-fPIC", "-std=c++17", f"-I{tdir / 'include'}", str(src),
           f"-L{tdir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}", "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SimUnavailable(f"building the simulated CUDA device failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


_lib = None
LIB_ENV = "A3PO_SIM_CUDA_LIB"  # the built library; a simulation process loads it before `import torch`:
#   python -c "import ctypes, os; ctypes.CDLL(os.environ['A3PO_SIM_CUDA_LIB'], mode=ctypes.RTLD_GLOBAL); ..."
# (this module's package imports torch, so the loading cannot live here)


# ---------------------------------------------------------------------------------------------- torch.cuda
@dataclass(frozen=True)
class DeviceProperties:
    name: str = GPU_NAME
    total_memory: int = GPU_MEMORY
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132


class _Stream:
    def __init__(self, device=None, priority=0, **_k):
        self.device = device

    def wait_stream(self, *_a):
        pass

    def wait_event(self, *_a):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, *_a):
        pass

    def wait(self, *_a):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, _other):
        return 0.0


class _Generator:
    """A stand-in for one GPU's default CUDA generator: states are opaque tokens (fake tensors draw no
    numbers)."""

    def __init__(self):
        self._state = ("seed", 0)

    def manual_seed(self, seed):
        self._state = ("seed", int(seed))
        return self

    def get_state(self):
        return self._state

    def set_state(self, st):
        self._state = st

    graphsafe_get_state = get_state
    graphsafe_set_state = set_state

    def clone_state(self):
        g = _Generator()
        g._state = self._state
        return g

    def initial_seed(self):
        return self._state[1]


class SimCuda:
    """``torch.cuda`` as a simulated rank sees it: one node of MAX_LOCAL_GPUS H100s. Counts the
    device-wide synchronisations (``synchronize_calls``). An attribute not simulated is an
    AttributeError naming it, never a silent CPU fallback."""

    FloatTensor = "torch.cuda.FloatTensor"
    HalfTensor = "torch.cuda.HalfTensor"
    BFloat16Tensor = "torch.cuda.BFloat16Tensor"
    Stream = _Stream
    Event = _Event

    def __init__(self):
        self._device = 0
        self.synchronize_calls = 0
        self.synchronize_callers: dict[str, int] = {}  # module -> calls (ours vs megatron's)
        self.default_generators = tuple(_Generator() for _ in range(MAX_LOCAL_GPUS))
        self.random = types.SimpleNamespace(get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state)
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                          range=contextlib.nullcontext, mark=lambda *a, **k: None)
        self.amp = types.SimpleNamespace(custom_fwd=lambda f=None, **k: f if f else (lambda g: g),
                                         custom_bwd=lambda f=None, **k: f if f else (lambda g: g))

    # devices
    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def device_count(self):
        return MAX_LOCAL_GPUS

    def current_device(self):
        return self._device

    def set_device(self, d):
        import torch

        i = d.index if isinstance(d, torch.device) else int(d)
        if i is None or not 0 <= i < MAX_LOCAL_GPUS:
            raise RuntimeError(f"CUDA error: invalid device ordinal {d}")
        self._device = i
        _lib.a3po_sim_set_device(i)
        _clear_fake_cache()

    def get_device_properties(self, _d=None):
        return DeviceProperties()

    def get_device_capability(self, _d=None):
        p = DeviceProperties()
        return (p.major, p.minor)

    def get_device_name(self, _d=None):
        return GPU_NAME

    def synchronize(self, _d=None):
        self.synchronize_calls += 1
        f = sys._getframe(1)
        while f is not None and f.f_globals.get("__name__", "").startswith("megatron_a3po.platform"):
            f = f.f_back  # count the caller of platform.synchronize, not the helper
        who = f.f_globals.get("__name__", "?") if f is not None else "?"
        self.synchronize_callers[who] = self.synchronize_callers.get(who, 0) + 1

    def empty_cache(self):
        pass

    def memory_allocated(self, _d=None):
        return 0

    def max_memory_allocated(self, _d=None):
        return 0

    def reset_peak_memory_stats(self, _d=None):
        pass

    # streams
    def current_stream(self, _d=None):
        return _Stream()

    def default_stream(self, _d=None):
        return _Stream()

    def stream(self, s=None):
        return contextlib.nullcontext(s)

    # RNG
    def manual_seed(self, seed):
        self.default_generators[self._device].manual_seed(seed)

    def manual_seed_all(self, seed):
        for g in self.default_generators:
            g.manual_seed(seed)

    def get_rng_state(self, device="cuda"):
        return self.default_generators[self._device].get_state()

    def set_rng_state(self, st, device="cuda"):
        self.default_generators[self._device].set_state(st)

    def _lazy_call(self, fn, **_k):
        fn()

    def __getattr__(self, name):
        raise AttributeError(f"torch.cuda.{name} is not simulated (megatron_a3po.platform.sim.SimCuda)")


SIM_CUDA: SimCuda | None = None


def _clear_fake_cache():
    """FakeTensorMode caches op results by their inputs, process-wide: a tensor made on "cuda" (no index)
    must not come back on the GPU of the device set before (or of the rank simulated before)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode.cache_clear()


class _TorchWithSimCuda(types.ModuleType):
    """``torch`` with ``torch.cuda`` replaced by the simulation's, for the modules that name it."""

    def __init__(self, cuda):
        super().__init__("torch")
        self.cuda = cuda

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def tensor(data, *a, **k):
        """``torch.tensor`` of a list of tensors reads each value (``item``) below the dispatcher, where a
        fake tensor has none: the same tensor is built from them by ops (megatron's local l2-norm)."""
        import torch

        def has_tensor(x):
            return isinstance(x, torch.Tensor) or isinstance(x, (list, tuple)) and any(has_tensor(y) for y in x)

        def build(x):
            if isinstance(x, torch.Tensor):
                return x.detach().reshape(()).to("cpu")
            return torch.stack([build(y) for y in x])

        dev = k.get("device")
        if dev is not None:  # torch.tensor(..., device="cuda") lands on GPU 0 under the fake mode: index it
            d = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
            k["device"] = torch.device("cuda", SIM_CUDA.current_device()) if d.type == "cuda" and d.index is None else d
        if isinstance(data, (list, tuple)) and data and has_tensor(data):
            out = build(data)
            return out.to(dtype=k.get("dtype") or out.dtype, device=k.get("device") or "cpu")
        return torch.tensor(data, *a, **k)


# ---------------------------------------------------------------------------------------------- groups
def _create_pg(common_opts, backend_opts):
    from torch._C._distributed_c10d import FakeProcessGroup

    return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)


class SimNCCLError(RuntimeError):
    pass


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _check_tensor(pg, t, name: str) -> None:
    if pg is not None:
        pg._get_backend(t.device)  # "No backend type associated with device type cpu", as NCCL groups
    if t.device.type == "cuda" and t.device.index != _local_rank():
        raise SimNCCLError(
            f"simulated NCCL: rank {os.environ.get('RANK')} (LOCAL_RANK {_local_rank()}) runs {name} on a "
            f"tensor on {t.device}: two ranks of the node would drive GPU {t.device.index} (NCCL: "
            "'Duplicate GPU detected'); set this rank's device to LOCAL_RANK before its first collective")


def _check_collective(func, args, kwargs):
    import torch
    from torch._C._distributed_c10d import ProcessGroup

    flat = list(args) + list(kwargs.values())
    pg = next((a for a in flat if isinstance(a, ProcessGroup)), None)
    tensors = []

    def collect(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                collect(y)

    for a in flat:
        collect(a)
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    for t in tensors:
        _check_tensor(pg, t, name)
    size = pg.size() if pg is not None else None
    if size is not None and tensors:
        base = func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else name
        out, inp = (args[0], args[1]) if len(args) > 1 else (None, None)
        if base in ("_allgather_base_", "allgather_into_tensor_coalesced_") and isinstance(out, torch.Tensor):
            if out.numel() != inp.numel() * size:
                raise SimNCCLError(f"simulated NCCL: {base} output of {out.numel()} elements for an input of "
                                   f"{inp.numel()} on a group of {size}")
        if base == "_reduce_scatter_base_" and isinstance(out, torch.Tensor):
            if inp.numel() != out.numel() * size:
                raise SimNCCLError(f"simulated NCCL: {base} input of {inp.numel()} elements for an output of "
                                   f"{out.numel()} on a group of {size}")
        if base == "allgather_" and isinstance(out, (list, tuple)) and out and isinstance(out[0], (list, tuple)):
            for o in out[0]:
                if len(o) != size and len(out[0]) == 1:
                    raise SimNCCLError(f"simulated NCCL: all_gather into {len(o)} tensors on a group of {size}")
        dts = {t.dtype for t in tensors}
        if base in ("allreduce_", "_allgather_base_", "_reduce_scatter_base_") and len(dts) > 1:
            raise SimNCCLError(f"simulated NCCL: {base} mixes dtypes {sorted(map(str, dts))}")


# ---------------------------------------------------------------------------------------------- modes
_NO_FAKE_IMPL = set()
OBSERVERS: list = []  # callables given every op's output (tools/simcluster's memory count), in the one mode


def _make_modes():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    c10d = torch.ops.c10d
    for name in ("reduce_scatter_tensor_coalesced_", "allgather_into_tensor_coalesced_", "allreduce_coalesced_"):
        if hasattr(c10d, name):
            _NO_FAKE_IMPL.add(getattr(c10d, name).default)

    class NCCLStrict(TorchDispatchMode):
        """Checks c10d ops as NCCL would and answers ``item()`` of data the simulation does not have."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (aten._local_scalar_dense.default, aten.item.default):
                t = args[0]
                if getattr(t, "constant", None) is None:
                    if t.dtype.is_floating_point:
                        return 1.0
                    if t.dtype == torch.bool:  # the healthy answer: all(...) holds, any(...) of a fault does not
                        return getattr(t, "_a3po_sim_truth", False)
                    return 1
            if func is aten.nonzero.default:  # data-dependent size: every element selected (the most memory)
                t = args[0]
                return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
            if func is aten.index.Tensor and len(args[1]) == 1 and args[1][0] is not None \
                    and args[1][0].dtype == torch.bool:  # t[mask]
                t, m = args[0], args[1][0]
                return torch.empty((m.numel(), *t.shape[m.dim():]), dtype=t.dtype, device=t.device)
            if func is aten.bincount.default:  # values below minlength (a clamped histogram's)
                t = args[0]
                n = int(kwargs.get("minlength", args[2] if len(args) > 2 else 0)) or 1
                w = kwargs.get("weights", args[1] if len(args) > 1 else None)
                return torch.zeros(n, dtype=w.dtype if w is not None else torch.long, device=t.device)
            if func is aten.masked_select.default:
                t, m = args[0], args[1]
                return torch.empty(torch.broadcast_shapes(t.shape, m.shape).numel(), dtype=t.dtype, device=t.device)
            if getattr(func, "namespace", None) == "c10d":
                _check_collective(func, args, kwargs)
                if func in _NO_FAKE_IMPL:  # coalesced collectives: checked above, then done (no data)
                    from torch._C._distributed_c10d import FakeWork

                    return FakeWork().boxed()
            out = func(*args, **kwargs)
            if OBSERVERS:
                for fn in OBSERVERS:
                    fn(out)
            name = getattr(func, "_overloadpacket", None)
            if name in (aten.all, aten.any) and isinstance(out, torch.Tensor):
                out._a3po_sim_truth = name is aten.all
            return out

    return FakeTensorMode, NCCLStrict


@contextlib.contextmanager
def fake_mode():
    """The context a simulated rank's code runs in: fake tensors, NCCL-strict collectives."""
    FakeTensorMode, NCCLStrict = _make_modes()
    with FakeTensorMode(allow_non_fake_inputs=True) as fm, NCCLStrict():
        yield fm


# ---------------------------------------------------------------------------------------------- objects
class _TensorDesc:
    __slots__ = ("shape", "dtype", "device")

    def __init__(self, t):
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, t.device


def _describe(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return _TensorDesc(obj)
    if isinstance(obj, dict):
        return {k: _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_describe(v) for v in obj)
    return obj


def _materialise(obj, local_rank_of_sender: int):
    """A peer's object as it unpickles here: each CUDA tensor on the sender's local GPU (what torch's
    pickling of a CUDA tensor does), CPU tensors on the CPU."""
    import copy

    import torch

    if isinstance(obj, _TensorDesc):
        dev = torch.device("cuda", local_rank_of_sender) if obj.device.type == "cuda" else obj.device
        return torch.empty(obj.shape, dtype=obj.dtype, device=dev)
    if isinstance(obj, dict):
        return {k: _materialise(v, local_rank_of_sender) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, local_rank_of_sender) for v in obj)
    return copy.deepcopy(obj)


class Transcript:
    """World-group object collectives of the ranks simulated so far in this process: the k-th call's
    contribution by role (pipeline stage, TP rank 0 or not)."""

    def __init__(self):
        self.calls: dict[int, dict[tuple, object]] = {}


@dataclass
class RankSpec:
    rank: int
    world: int
    gpus_per_node: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, dp, pp) rank of a global rank under megatron's default order tp-cp-ep-dp-pp."""
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return tp, dp, pp

    def role(self, rank: int) -> tuple[int, bool]:
        tp, _, pp = self.coords(rank)
        return pp, tp == 0

    def local_rank(self, rank: int) -> int:
        return rank % self.gpus_per_node


class _ObjectCollectives:
    def __init__(self, transcript: Transcript):
        self.transcript = transcript
        self.spec: RankSpec | None = None
        self.world_calls = 0

    def _is_world(self, group):
        import torch.distributed as dist

        return group is None or group == dist.group.WORLD

    def _peer_objects(self, group, obj):
        """The object of every member of ``group`` (group order), as it arrives here."""
        import torch.distributed as dist

        spec = self.spec
        members = dist.get_process_group_ranks(group) if not self._is_world(group) else list(range(spec.world))
        desc = _describe(obj)
        mine = spec.role(spec.rank)
        if self._is_world(group):
            k = self.world_calls
            self.world_calls += 1
            self.transcript.calls.setdefault(k, {})[mine] = desc
            known = self.transcript.calls[k]
        else:
            known = {mine: desc}
        out = []
        for p in members:
            d = known.get(spec.role(p), desc)
            out.append(obj if p == spec.rank else _materialise(d, spec.local_rank(p)))
        return members, out

    def _check_device(self, group):
        """Object collectives on an NCCL group stage their bytes on the current GPU (torch's
        ``_get_object_coll_device``): that GPU must be this rank's."""
        import torch
        import torch.distributed as dist

        from megatron_a3po.platform import gpu as D

        pg = dist.group.WORLD if self._is_world(group) else group
        _check_tensor(pg, torch.empty(1, dtype=torch.uint8, device=D.device()), "an object collective")

    def all_gather_object(self, object_list, obj, group=None):
        self._check_device(group)
        _, objs = self._peer_objects(group, obj)
        if len(object_list) != len(objs):
            raise SimNCCLError(f"all_gather_object: output list of {len(object_list)} for a group of {len(objs)}")
        object_list[:] = objs

    def gather_object(self, obj, object_gather_list=None, dst=0, group=None, group_dst=None):
        self._check_device(group)
        _, objs = self._peer_objects(group, obj)
        if object_gather_list is not None:
            object_gather_list[:] = objs

    def broadcast_object_list(self, object_list, src=None, group=None, device=None, group_src=None):
        import torch.distributed as dist

        self._check_device(group)
        members, objs = self._peer_objects(group, list(object_list))
        src = src if src is not None else dist.get_global_rank(group, group_src)
        if src != self.spec.rank:
            object_list[:] = objs[members.index(src)]

    def scatter_object_list(self, scatter_object_output_list, scatter_object_input_list=None, src=0, group=None,
                            group_src=None):
        import torch.distributed as dist

        self._check_device(group)
        members = dist.get_process_group_ranks(group) if not self._is_world(group) else list(range(self.spec.world))
        if self.spec.rank == src:
            scatter_object_output_list[0] = scatter_object_input_list[members.index(self.spec.rank)]
        else:
            raise SimNCCLError("scatter_object_list: a simulated rank cannot receive what another rank scatters")


# ---------------------------------------------------------------------------------------------- activation
_state: dict = {}


def _patch_megatron_modules(cuda) -> list[str]:
    import torch

    stand_in = _state.setdefault("torch", _TorchWithSimCuda(cuda))
    done = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = stand_in
            done.append(name)
    return done


def _wrap_fake_device():
    """A fake tensor made on "cuda" (no index) goes to the current GPU, as a real one does."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    orig = FakeTensor._normalize_fake_device
    if getattr(orig, "_a3po_sim", False):
        return

    def normalize(device):
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", SIM_CUDA.current_device())
        return orig(device)

    normalize._a3po_sim = True
    FakeTensor._normalize_fake_device = staticmethod(normalize)


def _wrap_fake_type():
    """``t.type()`` of a fake CUDA tensor names the CUDA type ('torch.cuda.BFloat16Tensor'), as a real
    one does (megatron's optimizers sort parameters by it)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if getattr(FakeTensor.type, "_a3po_sim", False):
        return
    orig = FakeTensor.type

    def type_(self, *a, **k):
        s = orig(self, *a, **k)
        if not a and not k and self.device.type == "cuda" and not s.startswith("torch.cuda."):
            return "torch.cuda." + s[len("torch."):]
        return s

    type_._a3po_sim = True
    FakeTensor.type = type_


def _wrap_gloo_groups():
    """megatron also makes gloo groups (CPU-side collectives) beside the NCCL ones: in the simulation
    they are fake groups for the CPU device only."""
    from megatron.core import parallel_state as ps

    orig = ps.create_group
    if getattr(orig, "_a3po_sim", False):
        return

    def create_group(*a, backend=None, **k):
        if backend == "gloo":
            backend = GLOO_BACKEND
        return orig(*a, backend=backend, **k)

    create_group._a3po_sim = True
    ps.create_group = create_group


def _wrap_p2p():
    """Receivers of a pipeline stage get the shape its schedule passes (module docstring)."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    cls = p2p.P2PCommunicator
    if getattr(cls._communicate, "_a3po_sim", False):
        return
    orig_comm, orig_shapes = cls._communicate, cls._communicate_shapes

    def _communicate(self, *a, tensor_shape=None, **k):
        self._a3po_sim_shape = list(tensor_shape) if tensor_shape is not None else None
        return orig_comm(self, *a, tensor_shape=tensor_shape, **k)

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        prev, nxt = orig_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
        shape = getattr(self, "_a3po_sim_shape", None)
        return (shape if recv_prev else prev), (shape if recv_next else nxt)

    _communicate._a3po_sim = True
    cls._communicate, cls._communicate_shapes = _communicate, _communicate_shapes


# modules imported before patching, so that their ``torch`` name is replaced
MEGATRON_MODULES = (
    "megatron.core.parallel_state", "megatron.core.tensor_parallel", "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers", "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils", "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.module", "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention", "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp", "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.distributed.distributed_data_parallel", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads", "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.grad_scaler",
    "megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils", "megatron.core.rerun_state_machine", "megatron.core.utils",
    "megatron.core.fusions.fused_bias_swiglu", "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
)


def activate() -> SimCuda:
    """Make this process a simulated GPU node (idempotent). Needs the library of ``LIB_ENV`` loaded before torch."""
    global SIM_CUDA
    if SIM_CUDA is not None:
        return SIM_CUDA
    global _lib
    import ctypes

    import torch

    if _lib is None:
        if LIB_ENV not in os.environ:
            raise SimUnavailable(f"{LIB_ENV} is not set: load build_sim_cuda()'s library before torch")
        _lib = ctypes.CDLL(os.environ[LIB_ENV], mode=ctypes.RTLD_GLOBAL)
    import torch.distributed as dist

    if torch.accelerator.current_accelerator() is None or torch.accelerator.current_accelerator().type != "cuda":
        raise SimUnavailable("the simulated CUDA device did not register (loaded after torch?)")
    from megatron_a3po.platform import gpu as D

    SIM_CUDA = SimCuda()
    D._sim = SIM_CUDA
    import torch._subclasses.fake_tensor  # its device normalisation reads torch.cuda

    for name in MEGATRON_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _patch_megatron_modules(SIM_CUDA)
    _wrap_p2p()
    if BACKEND.upper() not in dir(dist.Backend):
        dist.Backend.register_backend(BACKEND, _create_pg, extended_api=True, devices=["cuda"])
        dist.Backend.register_backend(GLOO_BACKEND, _create_pg, extended_api=True, devices=["cpu"])
    _wrap_gloo_groups()
    _wrap_fake_device()
    _wrap_fake_type()
    from megatron_a3po.platform import stores

    if not getattr(stores.init_default_group, "_a3po_sim", False):  # ranks started by platform.procs
        def init_default_group(backend, timeout=None, **_k):
            init_process_group(timeout=timeout)

        init_default_group._a3po_sim = True
        stores.init_default_group = init_default_group
    tr = _state.setdefault("objects", _ObjectCollectives(Transcript()))
    for fn in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"):
        setattr(dist, fn, getattr(tr, fn))
        setattr(dist.distributed_c10d, fn, getattr(tr, fn))
    return SIM_CUDA


def init_process_group(timeout=None) -> None:
    """The default group of the simulated rank named by RANK / WORLD_SIZE (NCCL-strict, no peers)."""
    import datetime

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group(BACKEND, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            store=FakeStore(), timeout=timeout or datetime.timedelta(minutes=30))


def begin_rank(spec: RankSpec) -> None:
    """Environment of a fresh rank process (as torchrun sets it): current GPU 0 until set_device."""
    activate()
    os.environ.update(RANK=str(spec.rank), WORLD_SIZE=str(spec.world), LOCAL_RANK=str(spec.local_rank(spec.rank)),
                      LOCAL_WORLD_SIZE=str(spec.gpus_per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    SIM_CUDA._device = 0
    _lib.a3po_sim_set_device(0)
    _clear_fake_cache()
    SIM_CUDA.synchronize_calls = 0
    SIM_CUDA.synchronize_callers = {}
    objs = _state["objects"]
    objs.spec, objs.world_calls = spec, 0
    _patch_megatron_modules(SIM_CUDA)  # megatron modules imported since


def end_rank() -> None:
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        from megatron.core.tensor_parallel import random as r

        r._CUDA_RNG_STATE_TRACKER = None
        r._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    except Exception:  # noqa: BLE001 - best effort between ranks
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return SIM_CUDA is not None
