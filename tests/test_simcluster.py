"""The simulated GPU cluster tier: each GPU recipe's real code at its real layout, rank by rank, on fake
CUDA tensors and NCCL-strict process groups (megatron_a3po.platform.sim, tools/simcluster).

One child process simulates, per recipe, the last pipeline stage's TP rank 0, a TP rank > 0 (or, at TP=1,
another GPU of node 0) and global rank 0, through a whole training step (collate, recompute pass,
forward/backward in Megatron's schedule, DDP grad reduce, optimizer step, stats gather), the HF export
and the checkpoint's sharded state dicts, at the worst micro-batch (max_tokens_per_mb of the longest
samples). What a GPU would reject fails here the same way: a CPU tensor into the CUDA model
(FakeTensorDeviceMismatchError), a CPU tensor to an NCCL group ("No backend type associated with device
type cpu"), two ranks on one GPU, per-rank stats unpickled on other GPUs. The memory it measures is
checked against arithmetic written here and against the 80 GB of an H100.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["qwen2_5_1_5b_gsm8k", "qwen2_5_7b_gsm8k", "qwen2_5_32b_gsm8k", "llama3_70b_gsm8k"]
GiB = 2**30

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the simulated CUDA device is built with g++")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two children side by side (two recipes each: the machine has two cores)."""
    d = tmp_path_factory.mktemp("simcluster")
    halves = [RECIPES[0::2], RECIPES[1::2]]
    procs = []
    for i, names in enumerate(halves):
        cmd = [sys.executable, "-m", "tools.simcluster", *[a for r in names for a in ("--recipe", r)],
               "--json", str(d / f"report{i}.json")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rep = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=1800)
        path = d / f"report{i}.json"
        assert p.returncode == 0 and path.exists(), out[-4000:]
        rep += json.loads(path.read_text())
    return {name: [x for x in rep if x["recipe"] == name] for name in RECIPES}


def _errors(ranks):
    return {f"rank {x['rank']} {k}": v["error"][:1500] for x in ranks for k, v in x["phases"].items() if not v["ok"]}


@pytest.mark.parametrize("name", RECIPES)
def test_one_step_runs_at_the_recipe_layout(report, name):
    ranks = report[name]
    lay = ranks[0]["layout"]
    coords = [x["coords"] for x in ranks]
    assert any(x["rank"] == 0 for x in ranks)
    assert any(c["pp"] == lay["pp"] - 1 for c in coords)  # a last-stage rank
    if lay["tp"] > 1:
        assert any(c["tp"] > 0 for c in coords)  # a TP rank > 0
    assert not _errors(ranks), _errors(ranks)
    for x in ranks:
        assert set(x["phases"]) >= {"init", "build", "step", "export", "checkpoint"}


@pytest.mark.parametrize("name", RECIPES)
def test_devices_sequence_parallel_and_syncs(report, name):
    for x in report[name]:
        lay, ck = x["layout"], x["checks"]
        # the HF export reaches global rank 0 only, whole and on its GPU; no other rank receives tensors
        ex = ck["export"]
        if x["rank"] == 0:
            assert ex["tensors"] > 0 and ex["devices"] == ["cuda:0"], ex
        else:
            assert ex["tensors"] == 0, ex
        # the model's checkpoint shards live on this rank's GPU (the optimizer's fully_reshardable state is
        # gathered to the host by megatron: host memory, docs/launch.md)
        local = f"cuda:{x['coords']['local_rank']}"
        assert ck["checkpoint"]["model"]["devices"] == [local], ck["checkpoint"]
        # sequence parallelism: every micro-batch's length is a multiple of TP
        if lay["sp"] and lay["tp"] > 1:
            assert all(S % lay["tp"] == 0 for S in ck["seq_lens"]), ck["seq_lens"]
        # per-rank stats cross ranks as host numbers, never as (CUDA) tensors
        assert set(ck.get("stats_types", [])) <= {"float", "int", "list"}, ck["stats_types"]
        # our device-wide waits: the recompute pass's timer (2) and one read of the loss's event timer, not
        # one per micro-batch (megatron's own: the pipeline's shape exchange at PP > 1)
        ours = sum(n for who, n in ck["synchronize_callers"].items() if who.startswith("megatron_a3po"))
        assert ours <= 3, ck["synchronize_callers"]
        if "spawn" in x["phases"]:
            assert ck["spawn"]["device"] == local


def _rank_params(cfg, tp: int, pp: int, stage: int) -> int:
    """Parameters of one rank of a Qwen2 / Llama GPTModel at TP x PP, from the HF config (independent of
    the code under test): vocab padded to a multiple of 128 x TP, TP-split linear layers, replicated norms."""
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nq
    V = cfg["vocab_size"]
    m = 128 * tp
    Vp = (V + m - 1) // m * m
    bias = cfg.get("qkv_bias", False)
    qkv = (nq + 2 * nkv) * d
    layer = qkv * h // tp + (qkv // tp if bias else 0) + h * nq * d // tp + 2 * f * h // tp + h * f // tp + 2 * h
    n = layer * (L // pp)
    if stage == 0:
        n += Vp // tp * h
    if stage == pp - 1:
        n += h
        if not cfg.get("tie_word_embeddings", False) or pp > 1:
            n += Vp // tp * h  # untied output layer (a tied one is a copy on the last stage at PP > 1)
    return n


@pytest.mark.parametrize("name", RECIPES)
def test_measured_param_and_optimizer_bytes_match_arithmetic(report, name):
    from launch.arch import KNOWN

    from megatron_a3po.config import load_recipe

    rec = load_recipe(name)
    cfg = dict(KNOWN[rec.model.hf_path.rstrip("/").split("/")[-1].lower()])
    cfg["qkv_bias"] = cfg["architectures"][0].startswith("Qwen2")
    for x in report[name]:
        lay, mem = x["layout"], x["memory"]
        n = _rank_params(cfg, lay["tp"], lay["pp"], x["coords"]["pp"])
        assert abs(mem["params"] - 2 * n) <= 0.01 * 2 * n, (mem["params"], 2 * n)  # bf16
        # distributed optimizer: this DP rank's 1/DP of the fp32 main weights and both Adam moments
        want = 12 * n / lay["dp"]
        assert abs(mem["optimizer"] - want) <= 0.01 * want, (mem["optimizer"], want)
        assert abs(mem["grads"] - 4 * n) <= 0.01 * 4 * n, (mem["grads"], 4 * n)  # fp32 main grads


@pytest.mark.parametrize("name", RECIPES)
def test_peak_memory_fits_an_h100(report, name):
    peak = max(x["memory"]["peak_total"] for x in report[name])
    limit = 72 * GiB if name in ("qwen2_5_32b_gsm8k", "llama3_70b_gsm8k") else 80 * GiB
    assert peak <= limit, f"{name}: {peak / GiB:.1f} GiB per GPU > {limit / GiB:.0f} GiB"
