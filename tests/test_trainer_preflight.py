"""Bad input reaches the user as a clear error before any training starts (the CLI exits 2)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from megatron_a3po.trainer.preflight import PreflightError, preflight
from megatron_a3po.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_missing_checkpoint_path_is_named(tmp_path):
    r = load_recipe("demo_cpu", ["model.tiny=null", f"model.mcore_path={tmp_path / 'nope'}"])
    with pytest.raises(PreflightError, match=r"model.mcore_path=.*nope: directory not found"):
        preflight(r)
    r = load_recipe("demo_cpu", ["model.tiny=null", f"model.hf_path={tmp_path}"])
    with pytest.raises(PreflightError, match=r"model.hf_path=.*config.json not found"):
        preflight(r)


def test_tp_that_does_not_divide_the_heads():
    r = load_recipe("demo_cpu", ["parallel.tp=3"])
    with pytest.raises(PreflightError, match=r"parallel.tp=3 does not divide num_attention_heads=4"):
        preflight(r)
    r = load_recipe("demo_cpu", ["parallel.tp=4"])  # 4 heads but 2 KV heads
    with pytest.raises(PreflightError, match=r"parallel.tp=4 does not divide num_key_value_heads=2"):
        preflight(r)
    r = load_recipe("demo_cpu", ["parallel.pp=3"])
    with pytest.raises(PreflightError, match=r"parallel.pp=3 does not divide num_hidden_layers=2"):
        preflight(r)


def test_malformed_dataset_line_is_named_with_its_line_number(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "12", "answer": "2"}\n{"question": "34", "answer": \n')
    r = load_recipe("demo_cpu", [f"data.train_path={f}"])
    with pytest.raises(PreflightError, match=r"train.jsonl:2: malformed JSON"):
        preflight(r)


def test_unreachable_rollout_server():
    from megatron_a3po.platform.procs import free_port

    url = f"http://127.0.0.1:{free_port()}"
    r = load_recipe("demo_cpu", [f"rollout.engine_urls=[{url}]"])
    with pytest.raises(PreflightError, match=r"rollout.engine_urls: http://127.0.0.1:\d+ unreachable"):
        preflight(r)


def test_unknown_key_and_impossible_combination_name_the_key():
    with pytest.raises(RecipeError, match=r"trainer.nope"):
        load_recipe("demo_cpu", ["trainer.nope=1"])
    with pytest.raises(RecipeError, match=r"trainer.verify_weight_sync needs rollout.backend=cpu"):
        load_recipe("demo_cpu", ["rollout.backend=sglang", "trainer.verify_weight_sync=true"])


def test_cli_exits_2_before_training(tmp_path):
    env = subprocess_env(PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu",
                        "--run-dir", str(tmp_path / "run"), "parallel.tp=3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "parallel.tp=3 does not divide num_attention_heads=4" in p.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=-5e-4", "trainer.lr"), ("trainer.lr=0", "trainer.lr"), ("trainer.lr=nan", "trainer.lr"),
    ("trainer.adam_beta2=1.0", "trainer.adam_beta2"), ("trainer.adam_eps=0", "trainer.adam_eps"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"), ("trainer.warm_start_lr=0", "trainer.warm_start_lr"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay"), ("trainer.save_every=-2", "trainer.save_every"),
    ("rollout.top_k=0", "rollout.top_k"), ("rollout.temperature=inf", "rollout.temperature"),
    ("rollout.request_timeout_s=0", "rollout.request_timeout_s"), ("loss.eps_clip_high=-0.2", "loss.eps_clip_high"),
    ("model.tiny.num_attention_heads=3", "model.tiny"),
])
def test_impossible_values_are_schema_errors_naming_the_key(override, key):
    with pytest.raises(RecipeError, match=re.escape(key)):
        load_recipe("demo_cpu", [override])
