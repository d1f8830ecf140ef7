"""Launcher: Slurm dry-runs of the GPU recipes, layout errors before anything is written, helpers.

Expectations are written out here from the recipes' intended layouts (not read from the launcher).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")

from launch import health
from launch.supervisor import Engine, router_command, server_command
from launch.run import main as launch_main
from megatron_a3po.engine.launch import sglang_command, sglang_env, sglang_python

IMAGE = "registry.example.com/a3po/train:25.01"
MOUNTS = ["/lustre/data:/data", "/lustre/models:/models"]

# recipe -> (trainer nodes, rollout nodes, engines, engine TP, torchrun nproc per node)
EXPECTED = {
    "qwen2_5_1_5b_gsm8k": (1, 1, 8, 1, 8),
    "qwen2_5_7b_gsm8k": (2, 1, 4, 2, 8),
    "qwen2_5_32b_gsm8k": (4, 2, 4, 4, 8),
    "llama3_70b_gsm8k": (8, 4, 4, 8, 8),
}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "nemorun_home"
    monkeypatch.setenv("NEMORUN_HOME", str(h))
    # nemo-run's local tunnel runs shell commands through invoke, which reads stdin (pytest forbids it)
    devnull = open(os.devnull)
    monkeypatch.setattr(sys, "stdin", devnull)
    yield h
    devnull.close()


def _files_under(p: Path) -> list[Path]:
    return [x for x in p.rglob("*") if x.is_file()] if p.exists() else []


def _dryrun(home, recipe, *extra, capsys):
    argv = ["--recipe", recipe, "--executor", "slurm", "--dryrun", "--account", "acct1", "--partition", "batch",
            "--container-image", IMAGE, "--job-dir", str(home / "jobs"), "--packager", "none"]
    for m in MOUNTS:
        argv += ["--mount", m]
    return _sbatch_text(argv + list(extra), capsys)


def _sbatch_text(argv, capsys):
    """Run the launcher's dry run; the text of the sbatch script it wrote (its path is the last line)."""
    rc = launch_main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    path = Path(out.out.strip().splitlines()[-1])
    assert path.is_file() and path.name.endswith("_sbatch.sh")
    return path.read_text()


def _job_recipe(text: str) -> dict:
    """The recipe file in the job directory of an sbatch script (srun's --chdir DIR/code without a
    container, its DIR:/nemo_run mount with one), as plain YAML data."""
    import yaml

    dirs = set(re.findall(r"--chdir (\S+)/code", text)) | set(re.findall(r"[ ,]([^ ,:]+):/nemo_run\b", text))
    assert len(dirs) == 1, dirs
    return yaml.safe_load((Path(dirs.pop()) / "a3po_recipe.yaml").read_text())


def _srun_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("srun --het-group=")]


def _group_headers(text):
    """#SBATCH lines per het group (split at '#SBATCH hetjob')."""
    groups, cur = [], []
    for ln in text.splitlines():
        if ln.strip() == "#SBATCH hetjob":
            groups.append(cur)
            cur = []
        elif ln.startswith("#SBATCH "):
            cur.append(ln[len("#SBATCH "):].lstrip("-"))
    groups.append(cur)
    return groups


def _argv_after(line, marker):
    """Shell-split the part of an srun line after ``marker`` (variables stay unexpanded)."""
    return shlex.split(line.split(marker, 1)[1].split(" & pids[")[0])


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_slurm_dryrun_sbatch(recipe, home, capsys):
    tn, rn, n_eng, etp, nproc = EXPECTED[recipe]
    text = _dryrun(home, recipe, capsys=capsys)

    # one heterogeneous job: trainer group then rollout group, with their node counts
    assert text.count("#SBATCH hetjob") == 1
    g0, g1 = _group_headers(text)
    assert f"nodes={tn}" in g0 and f"nodes={rn}" in g1
    for g in (g0, g1):
        assert "account=acct1" in g and "partition=batch" in g and "gpus-per-node=8" in g
        assert "ntasks-per-node=1" in g
    sruns = _srun_lines(text)
    assert len(sruns) == 2 and sruns[0].startswith("srun --het-group=0") and sruns[1].startswith("srun --het-group=1")
    for s in sruns:
        assert f"--container-image {IMAGE}" in s
        mounts = s.split("--container-mounts ", 1)[1].split()[0].split(",")
        assert all(m in mounts for m in MOUNTS)

    # rollout host variables defined in the script for every rollout node
    for k in range(rn):
        assert re.search(rf"^a3po_rollout_host_{k}=", text, re.M)
    assert not re.search(rf"^a3po_rollout_host_{rn}=", text, re.M)

    # rollout group: one launch.supervisor per node with one SGLang engine spec per engine
    fleet = _argv_after(sruns[1], "python -m launch.supervisor ")
    assert fleet[fleet.index("--backend") + 1] == "sglang"
    assert fleet[fleet.index("--engine-tp") + 1] == str(etp)
    specs = [fleet[i + 1] for i, a in enumerate(fleet) if a == "--engine"]
    assert len(specs) == n_eng
    engines = [tuple(int(x) for x in s.split(":")) for s in specs]  # index, node, base gpu, port
    assert sorted(e[0] for e in engines) == list(range(n_eng))
    assert sorted({e[1] for e in engines}) == list(range(rn))  # every rollout node used
    used = {}
    for _, node, base, port in engines:
        gpus = set(range(base, base + etp))
        assert gpus <= set(range(8))
        assert not (used.get(node, set()) & gpus), "engines share GPUs"
        used.setdefault(node, set()).update(gpus)
    ports_per_node = {}
    for _, node, _, port in engines:
        ports_per_node.setdefault(node, []).append(port)
    for ports in ports_per_node.values():
        assert len(ports) == len(set(ports)), "two engines on one node share a port"
    assert sum(len(v) for v in used.values()) == rn * 8  # the fleet fills the rollout GPUs
    hosts = fleet[fleet.index("--hosts") + 1].split(",")
    assert hosts == [f"${{a3po_rollout_host_{k}}}" for k in range(rn)]
    router_port = fleet[fleet.index("--router-port") + 1]
    assert fleet[fleet.index("--router-policy") + 1] == "cache_aware"
    assert int(router_port) not in {e[3] for e in engines}

    # trainer group: health wait on every engine + router, then torchrun over the trainer nodes
    tr = _argv_after(sruns[0], "python -m launch.health ")
    dash = tr.index("--")
    waits = [tr[i + 1] for i, a in enumerate(tr[:dash]) if a == "--url"]
    expected_urls = [f"http://${{a3po_rollout_host_{node}}}:{port}" for (_, node, _, port) in sorted(engines)]
    router_url = f"http://${{a3po_rollout_host_0}}:{router_port}"
    assert sorted(waits) == sorted(expected_urls + [router_url])
    cmd = tr[dash + 1:]
    assert cmd[0] == "torchrun"
    assert f"--nnodes={tn}" in cmd and f"--nproc-per-node={nproc}" in cmd
    # the rendezvous on the trainer group's head node (its NodeAddr); the node rank reaches each task
    # unexpanded (single-quoted in the script) and launch.health expands it there
    assert re.search(r"^a3po_trainer_head=.*SLURM_JOB_NODELIST_HET_GROUP_0", text, re.M)
    assert "--rdzv-endpoint=$a3po_trainer_head:29500" in cmd and "--node-rank=$SLURM_NODEID" in cmd
    assert "'--node-rank=$SLURM_NODEID'" in sruns[0] and "--expand-env" in tr[:dash]
    assert cmd[cmd.index("-m") + 1] == "megatron_a3po.trainer"
    # the trainer reads the launcher's merged recipe from the job directory (its cwd is the job's code/)
    assert cmd[cmd.index("--recipe") + 1] == "../a3po_recipe.yaml"
    assert _job_recipe(text)["name"] == recipe
    urls_arg = [a for a in cmd if a.startswith("rollout.engine_urls=")]
    assert len(urls_arg) == 1
    listed = urls_arg[0][len("rollout.engine_urls=["):-1].split(",")
    assert sorted(listed) == sorted(expected_urls)
    assert f"rollout.router_url={router_url}" in cmd


def test_overrides_reach_trainer_and_layout(home, capsys):
    # 7B on 4 trainer nodes: DP doubles, torchrun spans 4 nodes, the override is forwarded to the trainer
    text = _dryrun(home, "qwen2_5_7b_gsm8k", "cluster.trainer_nodes=4", "trainer.steps=7", capsys=capsys)
    g0, _ = _group_headers(text)
    assert "nodes=4" in g0
    tr = _argv_after(_srun_lines(text)[0], "python -m launch.health ")
    assert "--nnodes=4" in tr and not any(a.startswith(("trainer.", "cluster.")) for a in tr)
    job = _job_recipe(text)
    assert job["trainer"]["steps"] == 7 and job["cluster"]["trainer_nodes"] == 4


def test_cluster_file(home, tmp_path, capsys):
    cf = tmp_path / "cluster.yaml"
    cf.write_text("account: teamx\npartition: h100\ncontainer_image: img:7\ncontainer_mounts: ['/a:/b']\n"
                  "time: '01:30:00'\nenv_vars: {HF_HOME: /b/hf}\n")
    text = _sbatch_text(["--recipe", "qwen2_5_1_5b_gsm8k", "--executor", "slurm", "--dryrun", "--cluster", str(cf),
                         "--packager", "none", "--job-dir", str(home / "jobs")], capsys)
    g0, g1 = _group_headers(text)
    for g in (g0, g1):
        assert "account=teamx" in g and "partition=h100" in g and "time=01:30:00" in g
    assert "--container-image img:7" in text and "/a:/b" in text and "HF_HOME=/b/hf" in text


BAD = [
    ("qwen2_5_7b_gsm8k", ["parallel.tp=8"], "parallel.tp=8"),  # 28 heads / 4 KV heads
    ("qwen2_5_7b_gsm8k", ["parallel.pp=3"], "parallel.pp=3"),  # 28 layers
    ("qwen2_5_32b_gsm8k", ["parallel.pp=3"], "parallel.pp=3"),  # 64 layers, and 32 GPUs not / 24
    ("qwen2_5_1_5b_gsm8k", ["rollout.engine_tp=3"], "rollout.engine_tp=3"),
    ("qwen2_5_1_5b_gsm8k", ["rollout.engine_tp=16"], "rollout.engine_tp=16"),
    ("qwen2_5_1_5b_gsm8k", ["rollout.num_engines=5"], "rollout.num_engines=5"),
    ("qwen2_5_1_5b_gsm8k", ["cluster.rollout_nodes=0"], "cluster.rollout_nodes=0"),
    ("llama3_70b_gsm8k", ["cluster.max_nodes=8"], "cluster.max_nodes=8"),
    ("llama3_70b_gsm8k", ["cluster.trainer_nodes=3"], "cluster.trainer_nodes x cluster.gpus_per_node"),
    ("qwen2_5_1_5b_gsm8k", ["rollout.batch_prompts=1", "rollout.n_samples=4"], "data-parallel size 8"),
    ("qwen2_5_1_5b_gsm8k", ["model.hf_path=/nowhere/MysteryLM-3B"], "cluster.arch"),
    ("qwen2_5_1_5b_gsm8k", ["trainer.nonsense=1"], "trainer.nonsense"),
]


@pytest.mark.parametrize("recipe,overrides,knob", BAD)
def test_invalid_layout_fails_before_writing(recipe, overrides, knob, home, capsys):
    rc = launch_main(["--recipe", recipe, "--executor", "slurm", "--account", "a", "--container-image", "i",
                      "--job-dir", str(home / "jobs"), "--packager", "none", *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert knob in err
    assert _files_under(home) == []


def test_missing_account_and_image(home, capsys):
    rc = launch_main(["--recipe", "qwen2_5_1_5b_gsm8k", "--executor", "slurm", "--dryrun",
                      "--job-dir", str(home / "jobs")])
    err = capsys.readouterr().err
    assert rc == 2 and "cluster.account" in err and "cluster.container_image" in err
    assert _files_under(home) == []


def test_bad_cluster_file(home, tmp_path, capsys):
    cf = tmp_path / "c.yaml"
    cf.write_text("account: a\ncontainer_imag: typo\n")
    rc = launch_main(["--recipe", "qwen2_5_1_5b_gsm8k", "--executor", "slurm", "--cluster", str(cf)])
    err = capsys.readouterr().err
    assert rc == 2 and str(cf) in err and "container_imag" in err
    assert _files_under(home) == []


def test_arch_from_local_config_json(home, tmp_path, capsys):
    # a local HF directory's config.json wins over the table: 10 heads make TP4 invalid
    d = tmp_path / "Qwen2.5-7B-Instruct"
    d.mkdir()
    (d / "config.json").write_text('{"num_attention_heads": 10, "num_key_value_heads": 2, "num_hidden_layers": 28,'
                                   ' "hidden_size": 640, "intermediate_size": 1280, "vocab_size": 1000}')
    rc = launch_main(["--recipe", "qwen2_5_7b_gsm8k", "--executor", "slurm", "--account", "a", "--container-image",
                      "i", "--packager", "none", f"model.hf_path={d}"])
    err = capsys.readouterr().err
    assert rc == 2 and "num_attention_heads=10" in err and str(d / "config.json") in err


def test_slurm_dryrun_cpu_cluster(home, tmp_path, capsys):
    # the local CPU cluster file: 2 trainer nodes (one rank each, DP=2 across them) + 2 rollout nodes with
    # one CPU engine each, no container, no GPUs, shared nodes; the tiny model's weights are not built
    run_dir = tmp_path / "run"
    text = _sbatch_text(["--recipe", "demo_cpu", "--executor", "slurm", "--dryrun", "--cluster",
                         "recipes/clusters/local_cpu.yaml", "--packager", "none", f"trainer.log_dir={run_dir}"], capsys)
    g0, g1 = _group_headers(text)
    for g in (g0, g1):
        assert "nodes=2" in g and "ntasks-per-node=1" in g and "account=local" in g
        assert not any(x.startswith(("gpus-per-node", "exclusive")) for x in g), g
    sruns = _srun_lines(text)
    assert len(sruns) == 2 and "--container-image" not in text
    fleet = _argv_after(sruns[1], "python -m launch.supervisor ")
    assert fleet[fleet.index("--backend") + 1] == "cpu"
    assert fleet[fleet.index("--model-path") + 1] == str(run_dir / "init_hf")
    assert fleet[fleet.index("--bind-host") + 1] == "127.0.0.1"
    engines = [tuple(int(x) for x in fleet[i + 1].split(":")) for i, a in enumerate(fleet) if a == "--engine"]
    assert [e[:3] for e in engines] == [(0, 0, -1), (1, 1, -1)]  # one engine on each rollout node
    assert engines[0][3] != engines[1][3]  # the "nodes" share one host: ports differ
    tr = _argv_after(sruns[0], "python -m launch.health ")
    cmd = tr[tr.index("--") + 1:]
    assert "--nnodes=2" in cmd and "--nproc-per-node=1" in cmd
    # the cluster file's non-cluster settings reach the trainer through the job's recipe file
    job = _job_recipe(text)
    assert job["parallel"]["dp"] == 2 and job["rollout"]["num_engines"] == 2
    assert job["trainer"]["log_dir"] == str(run_dir)
    assert not run_dir.exists()  # a dry run prepares no weights


def test_cluster_file_sections_reach_the_trainer_typed(home, tmp_path, capsys, monkeypatch):
    """The trainer command of the sbatch script, read as the trainer reads it (in the job's code/ directory,
    the node's variables expanded), gives the recipe the launcher validated: a cluster file's
    ``rollout.engine_args`` (strings, one numeric) stays a list of strings (issue 24)."""
    import yaml

    from megatron_a3po.config import load_recipe

    raw = yaml.safe_load(Path("recipes/clusters/local_cpu.yaml").read_text())
    raw["rollout"]["engine_args"] = ["--chunked-prefill-size", "4096"]
    cf = tmp_path / "cluster.yaml"
    cf.write_text(yaml.safe_dump(raw))
    text = _sbatch_text(["--recipe", "demo_cpu", "--executor", "slurm", "--dryrun", "--cluster", str(cf),
                         "--packager", "none", "--job-dir", str(tmp_path / "jobs"), f"trainer.log_dir={tmp_path / 'run'}",
                         "trainer.steps=3"], capsys)
    sruns = _srun_lines(text)
    fleet = _argv_after(sruns[1], "python -m launch.supervisor ")
    assert fleet[fleet.index("--") + 1:][:2] == ["--chunked-prefill-size", "4096"]  # every engine's extra flags
    code_dir = Path(shlex.split(sruns[0])[shlex.split(sruns[0]).index("--chdir") + 1])  # srun's working dir
    code_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(code_dir)
    for k in range(2):
        monkeypatch.setenv(f"a3po_rollout_host_{k}", "127.0.0.1")
    tr = _argv_after(sruns[0], "python -m launch.health ")
    cmd = [os.path.expandvars(a) for a in tr[tr.index("--") + 1:]]  # launch.health --expand-env
    trainer = cmd[cmd.index("megatron_a3po.trainer") + 1:]
    assert trainer[0] == "--recipe"
    recipe = load_recipe(trainer[1], trainer[2:])
    assert recipe.rollout.engine_args == ["--chunked-prefill-size", "4096"]
    assert recipe.parallel.dp == 2 and recipe.rollout.num_engines == 2 and recipe.trainer.steps == 3
    assert recipe.trainer.log_dir == str(tmp_path / "run")
    assert len(recipe.rollout.engine_urls) == 2 and recipe.rollout.router_url.startswith("http://127.0.0.1:")


def test_slurm_cpu_nodes_need_cpu_engines(home, capsys):
    rc = launch_main(["--recipe", "demo_cpu", "--executor", "slurm", "--dryrun", "--cluster",
                      "recipes/clusters/local_cpu.yaml", "rollout.backend=sglang"])
    err = capsys.readouterr().err
    assert rc == 2 and "rollout.backend='sglang'" in err and "cluster.gpus_per_node=0" in err


# ---------------------------------------------------------------------------------------------
# helpers the job runs


def test_server_and_router_commands():
    e = Engine.parse("3:1:4:30002")
    cmd = server_command("sglang", "/models/q", e, engine_tp=4, bind_host="0.0.0.0", python="py",
                         mem_fraction_static=0.8, extra=["--random-seed", "1"])
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--model-path": "/models/q", "--tp-size": "4", "--host": "0.0.0.0", "--port": "30002",
                     "--base-gpu-id": "4", "--mem-fraction-static": "0.8", "--random-seed": "1",
                     "--weight-version": "0"}
    cpu = server_command("cpu", "/m", e, engine_tp=1, bind_host="127.0.0.1", python="py")
    assert cpu == ["py", "-m", "megatron_a3po.engine", "--model-path", "/m", "--port", "30002", "--host", "127.0.0.1",
                   "--weight-version", "0"]
    r = router_command(["http://a:1", "http://b:2"], port=30080, policy="cache_aware", host="0.0.0.0",
                       prometheus_port=30081, python="py")
    assert r[:3] == ["py", "-m", "sglang_router.launch_router"]
    # the router's own health checks, retries and circuit breaker are off (the Fleet does those)
    switches = ["--disable-health-check", "--disable-retries", "--disable-circuit-breaker"]
    assert all(f in r for f in switches)
    r = [a for a in r if a not in switches]
    i = r.index("--worker-urls")
    assert r[i + 1:i + 3] == ["http://a:1", "http://b:2"]
    flags = dict(zip(r[3:i:2], r[4:i:2])) | dict(zip(r[i + 3::2], r[i + 4::2]))
    assert flags == {"--host": "0.0.0.0", "--port": "30080", "--policy": "cache_aware",
                     "--prometheus-host": "127.0.0.1", "--prometheus-port": "30081"}


@functools.cache
def _cli_flags(python: str, module: str) -> set[str]:
    """The options ``python -m module --help`` lists (run once per test session)."""
    from conftest import subprocess_env

    env = subprocess_env(OMP_NUM_THREADS="1", **sglang_env(cpu=True))
    out = subprocess.run([python, "-m", module, "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


def _flags(cmd: list[str]) -> set[str]:
    return {a for a in cmd if a.startswith("--")}


def test_router_command_flags_exist_on_the_real_router():
    r = router_command(["http://a:1", "http://b:2"], port=30080, policy="cache_aware", host="0.0.0.0",
                       prometheus_port=30081, python=sys.executable)
    assert _flags(r) - _cli_flags(sys.executable, "sglang_router.launch_router") == set()


def test_server_command_flags_exist_on_the_real_sglang_server():
    """Every flag the launcher gives SGLang (a GPU node's command, and the CPU flags the trainer adds here)
    is one ``sglang.launch_server --help`` lists; the CPU engine's command parses with its own parser."""
    python = sglang_python()
    if python is None:
        pytest.skip("no SGLang environment (scripts/sglang_env.sh builds it; $A3PO_SGLANG_VENV)")
    e = Engine.parse("3:1:4:30002")
    gpu = server_command("sglang", "/models/q", e, engine_tp=4, bind_host="0.0.0.0", python=python,
                         mem_fraction_static=0.8, extra=["--random-seed", "1"])
    cpu = sglang_command("/m", port=30002, cpu=True, python=python)
    assert (_flags(gpu) | _flags(cpu)) - _cli_flags(python, "sglang.launch_server") == set()
    from megatron_a3po.engine.server import parse_args

    ours = server_command("cpu", "/m", e, engine_tp=1, bind_host="127.0.0.1", python="py", log_dir="/logs")
    a = parse_args(ours[3:])
    assert (a.model_path, a.port, a.host, a.weight_version, a.version_log) == ("/m", 30002, "127.0.0.1", "0",
                                                                               "/logs/engine-3.jsonl")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_health_gate(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        stop = tmp_path / "done"
        rc = health.main(["--url", url, "--timeout", "20", "--stop-file", str(stop), "--",
                          sys.executable, "-c", "import sys; sys.exit(5)"])
        assert rc == 5 and stop.read_text().strip() == "5"  # the command ran; its status comes back and is recorded
        marker = tmp_path / "ran"
        rc = health.main(["--url", url, "--url", "http://127.0.0.1:9", "--timeout", "1", "--",
                          sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
        assert rc == 3 and not marker.exists()  # a dead server: the command never starts
        # --expand-env: per-task variables are expanded from launch.health's own environment
        out = tmp_path / "rank"
        os.environ["A3PO_TEST_NODEID"] = "7"
        try:
            rc = health.main(["--url", url, "--expand-env", "--", sys.executable, "-c",
                              f"import sys; open({str(out)!r}, 'w').write(sys.argv[1])", "--node-rank=$A3PO_TEST_NODEID"])
        finally:
            del os.environ["A3PO_TEST_NODEID"]
        assert rc == 0 and out.read_text() == "--node-rank=7"
        with pytest.raises(SystemExit):
            health.main(["--url", url, "--expand-env", "--", sys.executable, "-c", "pass", "$A3PO_UNSET_VAR_X"])
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------
# local executor


def test_local_dryrun_cpu_fleet(home, tmp_path, capsys):
    # an HF directory on a CPU machine: the launcher starts the CPU engines, the trainer waits for them
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,'
                                   ' "hidden_size": 64, "intermediate_size": 128, "vocab_size": 50}')
    rc = launch_main(["--recipe", "demo_cpu", "--dryrun", "model.tiny=null", f"model.hf_path={d}",
                      "rollout.num_engines=2", "trainer.steps=2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.splitlines()
    tr = shlex.split(next(ln for ln in lines if " -m launch.health " in ln))
    fl = shlex.split(next(ln for ln in lines if " -m launch.supervisor " in ln))
    assert fl[fl.index("--backend") + 1] == "cpu" and fl[fl.index("--model-path") + 1] == str(d)
    assert [fl[i + 1] for i, a in enumerate(fl) if a == "--engine"] == ["0:0:-1:30000", "1:0:-1:30001"]
    assert "--router-port" not in fl  # no router on CPU
    urls = ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    assert [tr[i + 1] for i, a in enumerate(tr) if a == "--url"] == urls
    assert f"rollout.engine_urls=[{','.join(urls)}]" in tr and "--nproc-per-node=1" in tr
    assert tr[tr.index("-m", tr.index("--")) + 1] == "torch.distributed.run"
    # no TCP rendezvous (torchrun's stores listen on every interface): a file store, loopback master
    assert "--standalone" not in tr and "--rdzv-conf=store_type=file" in tr and "--local-addr=127.0.0.1" in tr


@pytest.mark.slow
def test_local_launch_demo(tmp_path):
    """The CPU demo through nemo-run's local executor, 2 steps; the trainer writes its TensorBoard logs."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "recipes" / "demo_cpu.yaml").exists():
        pytest.skip("recipes/demo_cpu.yaml not on this branch yet")
    run_dir = tmp_path / "run"
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, "-m", "launch.run", "--recipe", "demo_cpu", "trainer.steps=2",
                        "trainer.warm_start_steps=0", f"trainer.log_dir={run_dir}"],
                       cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {run_dir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/reward/mean")) == 2


# ---------------------------------------------------------------------------------------------
# launch.supervisor against fake sglang / sglang_router modules (records its argv, serves /health)

_FAKE_SERVER = r'''
import http.server, json, os, sys
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
rec = os.environ["FAKE_RECORD"]
with open(os.path.join(rec, f"{__spec__.name}-{port}.json"), "w") as f:
    json.dump(argv, f)
if os.environ.get("FAKE_DIE_PORT") == str(port):
    sys.exit(7)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _fake_modules(root: Path) -> Path:
    for pkg, mod in (("sglang", "launch_server"), ("sglang_router", "launch_router")):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / f"{mod}.py").write_text(_FAKE_SERVER)
    return root


def _fleet(args, env):
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "launch.supervisor", *args], env=env,
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_fleet_starts_engines_router_and_stops(tmp_path):
    import json
    import time

    from megatron_a3po.platform.procs import free_port

    fake = _fake_modules(tmp_path / "fake")
    rec = tmp_path / "rec"
    rec.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{repo}", "FAKE_RECORD": str(rec)}
    p0, p1, p2, pr = (free_port() for _ in range(4))
    stop = tmp_path / "stop"
    common = ["--backend", "sglang", "--model-path", "/models/m", "--engine-tp", "2", "--hosts", "127.0.0.1,localhost",
              "--bind-host", "127.0.0.1", "--stop-file", str(stop), "--health-timeout", "60",
              "--engine", f"0:0:0:{p0}", "--engine", f"1:0:2:{p1}", "--engine", f"2:1:0:{p2}",
              "--router-port", str(pr), "--router-policy", "round_robin"]
    stop.touch()  # left over from an earlier attempt: the fleet must ignore it
    n0 = _fleet(["--node-index", "0", *common, "--", "--random-seed", "3"], env)
    n1 = _fleet(["--node-index", "1", *common, "--", "--random-seed", "3"], env)
    try:
        deadline = time.monotonic() + 60
        want = {f"sglang.launch_server-{p}.json" for p in (p0, p1, p2)} | {f"sglang_router.launch_router-{pr}.json"}
        while {f.name for f in rec.iterdir()} != want:
            assert time.monotonic() < deadline, sorted(f.name for f in rec.iterdir())
            assert n0.poll() is None and n1.poll() is None
            time.sleep(0.2)
        for port, gpu in ((p0, 0), (p1, 2), (p2, 0)):
            a = json.loads((rec / f"sglang.launch_server-{port}.json").read_text())
            flags = dict(zip(a[0::2], a[1::2]))
            assert flags == {"--model-path": "/models/m", "--tp-size": "2", "--host": "127.0.0.1",
                             "--port": str(port), "--base-gpu-id": str(gpu), "--random-seed": "3",
                             "--weight-version": "0"}
        r = json.loads((rec / f"sglang_router.launch_router-{pr}.json").read_text())
        i = r.index("--worker-urls")
        assert r[i + 1:i + 4] == [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{p1}", f"http://localhost:{p2}"]
        assert r[r.index("--policy") + 1] == "round_robin"
        stop.touch()
        assert n0.wait(timeout=60) == 0 and n1.wait(timeout=60) == 0
        assert not health.healthy(f"http://127.0.0.1:{p0}") and not health.healthy(f"http://127.0.0.1:{pr}")
    finally:
        for p in (n0, n1):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_fleet_exits_when_an_engine_dies(tmp_path):
    from megatron_a3po.platform.procs import free_port

    fake = _fake_modules(tmp_path / "fake")
    rec = tmp_path / "rec"
    rec.mkdir()
    repo = Path(__file__).resolve().parents[1]
    p0, p1 = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{repo}", "FAKE_RECORD": str(rec),
           "FAKE_DIE_PORT": str(p1)}
    n = _fleet(["--model-path", "/m", "--bind-host", "127.0.0.1", "--engine", f"0:0:0:{p0}",
                "--engine", f"1:0:1:{p1}", "--node-index", "0"], env)
    try:
        assert n.wait(timeout=60) == 7
        assert not health.healthy(f"http://127.0.0.1:{p0}")  # the surviving engine was stopped
    finally:
        if n.poll() is None:
            n.kill()
            n.wait()


def test_keyed_wrapper_passes_the_key_in_argv_not_the_command_line(tmp_path):
    """SGLang's server and router take --api-key as a flag: launch.keyed adds it inside the process, so
    /proc/PID/cmdline (what ps shows) never holds the key."""
    import json
    import subprocess

    from launch.keyed import keyed_command

    (tmp_path / "show_argv.py").write_text(
        "import json, sys\nprint(json.dumps({'argv': sys.argv[1:], "
        "'cmdline': open('/proc/self/cmdline').read().split(chr(0))}))\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)]), "A3PO_API_KEY": "s3cret"}
    cmd = [sys.executable, "-m", "show_argv", "--port", "1"]
    os.environ["A3PO_API_KEY"] = "s3cret"
    try:
        wrapped = keyed_command(cmd)
    finally:
        del os.environ["A3PO_API_KEY"]
    assert keyed_command(cmd) == cmd  # no key in this process: unchanged
    assert wrapped[:4] == [sys.executable, "-m", "launch.keyed", "show_argv"] and "s3cret" not in wrapped
    out = json.loads(subprocess.run(wrapped, env=env, capture_output=True, text=True, check=True).stdout)
    assert out["argv"] == ["--port", "1", "--api-key", "s3cret"]
    assert not any("s3cret" in a for a in out["cmdline"])


def test_each_het_group_runs_its_own_image(home, capsys):
    """The trainer group runs the NGC PyTorch image (megatron-core), the rollout group SGLang's own image
    (this package in it without dependencies): one container_image per executor."""
    text = _dryrun(home, "qwen2_5_1_5b_gsm8k", "--rollout-container-image", "lmsysorg/sglang:v0.5.23", capsys=capsys)
    sruns = _srun_lines(text)
    assert f"--container-image {IMAGE}" in sruns[0] and "lmsysorg/sglang" not in sruns[0]
    assert "--container-image lmsysorg/sglang:v0.5.23" in sruns[1] and f"--container-image {IMAGE} " not in sruns[1]


def test_the_gpu_extra_does_not_pull_sglang():
    """`pip install ".[gpu]"` into the NGC image must not bring sglang (its torch pin would replace the
    image's torch): sglang and its router are in the `rollout` extra, for SGLang's own image."""
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not [d for d in extras["gpu"] if d.lower().startswith(("sglang", "torch"))], extras["gpu"]
    assert "sglang==0.5.23" in extras["rollout"]
