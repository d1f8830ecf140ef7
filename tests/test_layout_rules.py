"""One Arch and one layout validator: each bad layout gets the same message from the trainer's preflight,
the model builder and the launcher. The expected messages are written out here from the model's shape
(demo_cpu: 4 heads, 2 KV heads, 2 layers), not taken from the code."""

import pytest

from megatron_a3po.config import load_recipe
from megatron_a3po.models import arch_of_model_cfg, build_model
from megatron_a3po.models.tiny import tiny_hf_config
from megatron_a3po.trainer.preflight import PreflightError, preflight

BAD = [
    (["parallel.tp=3"], "parallel.tp=3 does not divide num_attention_heads=4 (model.tiny)"),
    (["parallel.tp=4"], "parallel.tp=4 does not divide num_key_value_heads=2 (model.tiny)"),
    (["parallel.pp=3"], "parallel.pp=3 does not divide num_hidden_layers=2 (model.tiny)"),
    (["trainer.ppo_n_minibatches=5"],
     "rollout.batch_prompts x rollout.n_samples = 256 is not divisible by trainer.ppo_n_minibatches=5"),
]


def _launcher_message(recipe) -> str:
    from launch.layout import LayoutError, plan_layout

    with pytest.raises(LayoutError) as e:
        plan_layout(recipe, "local", local_gpus=0)
    return str(e.value)


@pytest.mark.parametrize("overrides,message", BAD)
def test_same_message_from_preflight_builder_and_launcher(overrides, message, monkeypatch):
    r = load_recipe("demo_cpu", overrides)
    assert r.rollout.batch_prompts * r.rollout.n_samples == 32 * 8  # the batch the expected text assumes (256 sequences)
    with pytest.raises(PreflightError) as e:
        preflight(r)
    assert message in str(e.value)
    assert message in _launcher_message(r)
    if "parallel." in message:  # the builder checks the model's layout (the batch is not its business)
        from megatron.core import parallel_state as ps

        cfg = tiny_hf_config("qwen2", vocab_size=12, hidden_size=r.model.tiny.hidden_size,
                             intermediate_size=r.model.tiny.intermediate_size, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: r.parallel.tp)
        monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: r.parallel.pp)
        with pytest.raises(ValueError) as e:  # raised before any parameter is allocated
            build_model(cfg)
        assert message.replace(" (model.tiny)", "") in str(e.value)


def test_one_arch_for_a_tiny_recipe_and_its_hf_config(tmp_path):
    """The recipe's model section and the HF config the trainer writes for it read to the same shape."""
    r = load_recipe("demo_cpu")
    a = arch_of_model_cfg(r.model)
    t = r.model.tiny
    assert (a.num_heads, a.num_kv_heads, a.num_layers, a.hidden_size, a.intermediate_size) == (
        t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers, t.hidden_size, t.intermediate_size)
    assert a.family == "qwen2" and a.source == "model.tiny"


def test_launcher_refuses_a_layout_whose_memory_does_not_fit_and_says_by_how_much():
    """The 70B at TP8 PP1 on one node with 40960 tokens per micro-batch: the estimate (weights+grads
    6 B x 70.6e9 / 8 = 53 GB alone, Adam 12 B x P / 8 / DP) is far above 80 GB."""
    from launch.layout import LayoutError, plan_layout

    r = load_recipe("llama3_70b_gsm8k", ["parallel.pp=1", "trainer.max_tokens_per_mb=40960", "cluster.trainer_nodes=1",
                                         "cluster.account=a", "cluster.container_image=i"])
    with pytest.raises(LayoutError) as e:
        plan_layout(r, "slurm")
    msg = str(e.value)
    assert "GB more than the 80 GB of a GPU" in msg and "parallel.sequence_parallel" in msg, msg
