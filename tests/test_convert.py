"""Checkpoint conversion against independent references: transformers' own forward and the original
safetensors files. Several checks share one spawned run per layout to keep the suite short."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
import torch

from megatron_a3po.platform.procs import run_distributed

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2", "llama", "qwen3")


def _cli(*args, timeout=300):
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tools.convert_ckpt", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_a3po.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("hf")
    out = {}
    x = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    for fam in FAMILIES:
        d = save_tiny_hf_model(root / fam, fam, num_hidden_layers=2)
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(d).eval()(x).logits
        out[fam] = (str(d), ref)
    return out, x


def _logits_rank(rank, world, tp, pp, items, x, mcore_dir, bucket):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_a3po.convert import ExportStats, export_hf_weights, load_hf_into_model, load_mcore_checkpoint
    from megatron_a3po.models import build_model
    from megatron_a3po.platform import init_distributed

    init_distributed(tp=tp, pp=pp)
    res = {}
    for fam, hf_dir in items:
        cfg = AutoConfig.from_pretrained(hf_dir)
        model = build_model(cfg)
        if mcore_dir is not None:
            load_mcore_checkpoint([model], mcore_dir)
        else:
            load_hf_into_model([model], hf_dir, cfg)
        pos = torch.arange(x.shape[1])[None].expand_as(x)

        def fwd(it, m):
            b = next(it)
            return m(b, pos, None), lambda o: (o.sum() * 0, {"logits": o.detach()})

        out = get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter([x]), model=[model],
                                          num_microbatches=1, seq_length=x.shape[1], micro_batch_size=x.shape[0],
                                          forward_only=True)
        r = {}
        if ps.is_pipeline_last_stage():
            lg = out[0]["logits"]
            if tp > 1:
                parts = [torch.empty_like(lg) for _ in range(tp)]
                torch.distributed.all_gather(parts, lg, group=ps.get_tensor_model_parallel_group())
                lg = torch.cat(parts, -1)
            r["logits"] = lg[..., : cfg.vocab_size]
        # streaming export == the original HF tensors on rank 0, with bounded extra memory; no other rank
        # receives any (the owner stage sends each tensor to rank 0 only)
        st = ExportStats()
        got = {n: t for b in export_hf_weights([model], cfg, bucket, stats=st) for n, t in b}
        orig = load_file(str(Path(hf_dir) / "model.safetensors"))
        if rank == 0:
            r["export_equal"] = (sorted(got) == sorted(orig) and all(
                got[n].dtype == orig[n].dtype and torch.equal(got[n], orig[n]) for n in orig))
            largest = max(t.numel() * t.element_size() for t in orig.values())
            r["peak_ok"] = st.peak_bytes <= bucket + 3 * largest and st.buckets > 1
        else:
            r["export_equal"] = r["peak_ok"] = not got and st.buckets == 0
        res[fam] = r
    return res


def _check(outs, models_, tol=1e-5):
    refs, _ = models_
    for fam in FAMILIES:
        per_rank = [o[fam] for o in outs]
        lg = [r["logits"] for r in per_rank if "logits" in r]
        assert lg, fam
        for l in lg:
            assert (l - refs[fam][1]).abs().max().item() < tol, fam
        assert all(r["export_equal"] for r in per_rank), fam
        assert all(r["peak_ok"] for r in per_rank), fam


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_and_export_match_hf(models, tp, pp):
    refs, x = models
    items = [(f, refs[f][0]) for f in FAMILIES]
    outs = run_distributed(_logits_rank, tp * pp, tp, pp, items, x, None, 64 << 10, timeout=400)
    _check(outs, models)


def test_cli_round_trip_tp2_pp2_bit_identical_and_reload_at_other_layouts(models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    refs, x = models
    hf = refs["qwen2"][0]
    mc = tmp_path / "mcore"
    p = _cli("hf-to-mcore", "--hf", hf, "--out", mc, "--tp", 2, "--pp", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    back = tmp_path / "back"
    p = _cli("mcore-to-hf", "--mcore", mc, "--out", back)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(str(Path(hf) / "model.safetensors")), {}
    for f in back.glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        lg = AutoModelForCausalLM.from_pretrained(back).eval()(x).logits
    assert torch.equal(lg, refs["qwen2"][1])
    # the TP2xPP2 checkpoint loads at TP1xPP1 and at PP2 (same logits as HF)
    for tp, pp in [(1, 1), (1, 2)]:
        outs = run_distributed(_logits_rank, tp * pp, tp, pp, [("qwen2", hf)], x, str(mc), 64 << 10, timeout=300)
        lg = [o["qwen2"]["logits"] for o in outs if "logits" in o["qwen2"]]
        assert lg and (lg[0] - refs["qwen2"][1]).abs().max().item() < 1e-5


# ------------------------------------------------------------------ bad input: clear error, no output
@pytest.fixture()
def hf_copy(models, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(models[0]["llama"][0], d)
    return d


def _assert_rejected(args, out, match):
    p = _cli(*args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert match in p.stderr, p.stderr[-2000:]
    assert not Path(out).exists() or not any(Path(out).iterdir())
    assert not list(Path(out).parent.glob(f".{Path(out).name}.tmp*"))


def test_unsupported_architecture_is_named(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["model_type"] = "mixtral"
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    p = _cli("hf-to-mcore", "--hf", hf_copy, "--out", out)
    assert p.returncode == 2 and not out.exists()
    assert "MixtralForCausalLM" in p.stderr and "LlamaForCausalLM" in p.stderr and "Qwen2ForCausalLM" in p.stderr


def test_vocab_and_hidden_mismatch(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["vocab_size"] = 101
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    _assert_rejected(["hf-to-mcore", "--hf", hf_copy, "--out", tmp_path / "o"], tmp_path / "o", "vocab_size=101")
    cfg["vocab_size"], cfg["hidden_size"], cfg["head_dim"] = 97, 128, 16
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    _assert_rejected(["hf-to-mcore", "--hf", hf_copy, "--out", tmp_path / "o"], tmp_path / "o", "hidden_size=128")


def test_missing_and_truncated_shard(models, tmp_path):
    from megatron_a3po.models.tiny import save_tiny_hf_model

    d = save_tiny_hf_model(tmp_path / "sharded", "qwen2", num_hidden_layers=2, max_shard_size="60KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    _assert_rejected(["hf-to-mcore", "--hf", d, "--out", tmp_path / "o"], tmp_path / "o", "truncated")
    shards[1].unlink()
    _assert_rejected(["hf-to-mcore", "--hf", d, "--out", tmp_path / "o"], tmp_path / "o", "is missing")


def test_tp_not_dividing_heads_and_nonempty_out(hf_copy, tmp_path):
    _assert_rejected(["hf-to-mcore", "--hf", hf_copy, "--out", tmp_path / "o", "--tp", 3], tmp_path / "o",
         "--tp=3 does not divide num_attention_heads=8")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    p = _cli("hf-to-mcore", "--hf", hf_copy, "--out", out)
    assert p.returncode == 2 and "not empty (pass --overwrite" in p.stderr
    assert (out / "keep.txt").read_text() == "user data"


def test_a_new_family_is_one_file(tmp_path, monkeypatch):
    """A family file dropped into the families package is found by the builder and converter tables,
    and its table names exactly the HF model's own parameters (transformers' Mistral as the reference)."""
    from transformers import MistralConfig, MistralForCausalLM

    import megatron_a3po.models.families as fams
    from megatron_a3po.convert.rules import fill
    from megatron_a3po.models import arch_from_hf, family_of, supported_architectures

    (tmp_path / "mistral.py").write_text(
        "from megatron_a3po.models.families import Family\n"
        "FAMILY = Family('mistral', ('MistralForCausalLM',), qkv_bias=False)\n")
    monkeypatch.setattr(fams, "__path__", [*fams.__path__, str(tmp_path)])
    fams.registry.cache_clear()
    try:
        cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, architectures=["MistralForCausalLM"])
        assert supported_architectures()["MistralForCausalLM"] == "mistral" and family_of(cfg) == "mistral"
        arch = arch_from_hf(cfg)
        fam = fams.get_family("mistral")
        ours = {n for i in range(2) for r in fam.layer_table(arch).values() for n in fill(r, i).names()}
        ours |= {n for r in fam.global_table.values() for n in r.names()}
        hf = set(MistralForCausalLM(cfg).state_dict())
        assert ours == hf, (sorted(ours - hf), sorted(hf - ours))
    finally:
        fams.registry.cache_clear()


def test_out_overlapping_a_source_is_refused(hf_copy, tmp_path, capsys):
    """--out equal to, inside, or above a source (with --overwrite it would be deleted): exit 2, the
    source intact. Refused before any rank starts, so in-process."""
    from tools.convert_ckpt.cli import main

    before = sorted((p.name, p.stat().st_size) for p in hf_copy.iterdir())
    for out, what in ((hf_copy, "is the --hf directory itself"), (hf_copy / "mcore", "lies inside --hf"),
                      (hf_copy.parent, "contains --hf")):
        assert main(["hf-to-mcore", "--hf", str(hf_copy), "--out", str(out), "--overwrite"]) == 2
        assert what in capsys.readouterr().err
    (hf_copy / "metadata.json").write_text("{}")  # looks like an mcore checkpoint: the check comes first
    assert main(["mcore-to-hf", "--mcore", str(hf_copy), "--out", str(hf_copy / "x"), "--overwrite"]) == 2
    assert "lies inside --mcore" in capsys.readouterr().err
    assert main(["mcore-to-hf", "--mcore", str(tmp_path / "m"), "--hf-config", str(hf_copy), "--out",
                 str(hf_copy), "--overwrite"]) == 2
    assert "is the --hf-config directory itself" in capsys.readouterr().err
    (hf_copy / "metadata.json").unlink()
    assert sorted((p.name, p.stat().st_size) for p in hf_copy.iterdir()) == before
