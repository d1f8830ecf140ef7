import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no test reaches the hub: datasets reads local files only

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def subprocess_env(**extra) -> dict:
    """The environment for a child process started by a test: without torch.distributed variables that
    an in-process fixture may have set (a child would take them as a torchrun launch)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sglang_models(tmp_path_factory):
    """Two tiny Qwen2 models (seeds 0 and 1; context 1024 tokens) shared by the tests of the session."""
    from rollout_util import model_dirs

    return model_dirs(tmp_path_factory.mktemp("sglang-models"), 2, max_position_embeddings=1024)


@pytest.fixture(scope="session")
def sglang_server(sglang_models, tmp_path_factory):
    """One real SGLang 0.5.23 server for the session (started on first use; skipped with the reason when
    its environment is missing): ``(EngineProcess, model dirs)``. A test that changes its state puts it
    back (``real_sglang.reset``); tests that kill or restart servers start their own."""
    from real_sglang import start_sglang

    ep = start_sglang(sglang_models[0], version="0", log_dir=tmp_path_factory.mktemp("sglang-session"))
    yield ep, sglang_models
    ep.stop()
