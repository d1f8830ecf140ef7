"""The CPU support module: patches only without CUDA, module-local, idempotent; SDPA attention vs fp64."""

import math
import os

import pytest
import torch


def test_no_patch_when_cuda_is_available(monkeypatch):
    from megatron_a3po.platform import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.apply_cpu_patches() == []


def test_patches_are_module_local_and_idempotent():
    import megatron.core.pipeline_parallel.p2p_communication as p2p
    import megatron.core.pipeline_parallel.schedules as sched
    from megatron.core.models.common.language_module.language_module import LanguageModule

    from megatron_a3po.platform import cpu

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    first = cpu.apply_cpu_patches()
    assert cpu.apply_cpu_patches() == first  # idempotent
    assert set(cpu.PATCHED_MODULES) <= set(first)
    assert sched.torch is cpu.TORCH_ON_CPU
    # what the patched modules see
    assert sched.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert p2p.torch.cuda.current_device() == torch.device("cpu")
    assert p2p.torch.cuda.synchronize() is None
    assert sched.torch.Tensor is torch.Tensor and sched.torch.float32 is torch.float32
    # torch itself is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert torch.Tensor.cuda.__name__ == "cuda"
    wrapped = LanguageModule.setup_embeddings_and_output_layer
    assert getattr(wrapped, "_a3po_cpu_patch", False)
    seen = {}
    assert callable(wrapped.__wrapped__)  # the original is kept

    def probe(*a, **k):
        seen["cuda_is_identity"] = torch.ones(2).cuda().device.type == "cpu"

    cpu._tensor_cuda_is_identity(probe)()
    assert seen["cuda_is_identity"]
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()  # restored after the call


@pytest.fixture(scope="module")
def dist1():
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.platform.procs import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(tp=1, pp=1, seed=0)
    yield
    for k, v in saved.items():  # leave no torchrun-like variables to later tests' child processes
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_sdpa_core_attention_matches_fp64_reference(dist1):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_a3po.models.builder import arch_from_hf, transformer_config
    from megatron_a3po.models.tiny import tiny_hf_config
    from megatron_a3po.platform.attention import SDPACoreAttention

    cfg = transformer_config(arch_from_hf(tiny_hf_config("llama")))  # 8 heads, 2 KV groups
    att = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(0)
    sq, b, h, kv, d = 5, 2, 8, 2, cfg.kv_channels
    q, k, v = (torch.randn(sq, b, n, d, generator=g) for n in (h, kv, kv))
    out = att(q, k, v, None)
    # reference: plain softmax attention in fp64, head i uses KV group i // (h / kv), causal
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = torch.empty(sq, b, h, d, dtype=torch.float64)
    for i in range(h):
        gi = i // (h // kv)
        s = torch.einsum("sbd,tbd->bst", qd[:, :, i], kd[:, :, gi]) / math.sqrt(d)
        s = s.masked_fill(torch.triu(torch.ones(sq, sq, dtype=torch.bool), 1), float("-inf"))
        ref[:, :, i] = torch.einsum("bst,tbd->sbd", s.softmax(-1), vd[:, :, gi])
    torch.testing.assert_close(out.double(), ref.reshape(sq, b, h * d), atol=1e-5, rtol=1e-5)
