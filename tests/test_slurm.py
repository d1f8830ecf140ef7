"""The Slurm launch path on a real Slurm cluster: scripts/slurm_local.sh starts one on this machine (four
slurmd "nodes"), ``python -m launch.run --executor slurm --cluster recipes/clusters/local_cpu.yaml``
submits the CPU recipe to it as one heterogeneous job (trainer on 2 nodes, 2 CPU engines behind
sglang-router on 2 more).

Skipped, with the reason, where Slurm cannot be installed or started (no root, no apt).
Expectations come from the recipe and the cluster file (node names from slurm_local.sh, 2 trainer ranks,
2 engines), from Slurm itself (squeue, the processes' SLURM_JOB_ID) and from the trainer's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

pytest.importorskip("nemo_run")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
CLUSTER_FILE = "recipes/clusters/local_cpu.yaml"
MAX_STALENESS = 2  # recipes/demo_cpu.yaml rollout.max_staleness


def test_slurm_local_refuses_foreign_dirs(tmp_path):
    """The script touches only clusters it started: a directory with other content, or without its
    marker, is refused before anything is installed, started or stopped."""
    (tmp_path / "slurm.conf").write_text("ClusterName=someone_elses\n")
    for cmd in ("up", "down", "status"):
        r = subprocess.run(["bash", str(SCRIPT), cmd, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "holds no cluster started by this script" in r.stderr, (cmd, r.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["slurm.conf"]


@pytest.fixture(scope="module")
def slurm():
    """A running local cluster for this module; stopped at its end. Yields the environment to use.

    Its state lives in a directory of its own, not under pytest's rotating basetemp (another pytest
    session on the machine may prune that while the cluster runs)."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd runs jobs as their user)")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("launch.run ships the repository's HEAD (git archive): not a git checkout")
    base = Path(tempfile.mkdtemp(prefix="a3po_slurm_test_"))
    d = base / "cluster"
    up = subprocess.run(["bash", str(SCRIPT), "up", str(d)], capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"Slurm cannot be installed here: {up.stderr.strip()[-500:]}")
    assert up.returncode == 0, up.stdout + up.stderr
    conf = up.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    assert Path(conf).is_file()
    again = subprocess.run(["bash", str(SCRIPT), "up", str(d)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "reusing" in again.stderr and again.stdout == up.stdout  # idempotent
    venv_bin = str(Path(sys.executable).parent)
    env = subprocess_env(SLURM_CONF=conf, NEMORUN_HOME=str(base / "nemorun_home"), PYTHONPATH=str(REPO),
                         PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""), A3PO_NO_PROGRESS="1",
                         A3PO_TEST_BASE=str(base))
    try:
        yield env
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", str(d)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def work(slurm, request):
    d = Path(slurm["A3PO_TEST_BASE"]) / request.node.name
    d.mkdir()
    return d


def _launch(env, *overrides, detach=False, timeout=1500, cluster=CLUSTER_FILE):
    argv = [sys.executable, "-m", "launch.run", "--recipe", "demo_cpu", "--executor", "slurm",
            "--cluster", str(cluster), *(["--detach"] if detach else []), *overrides]
    return subprocess.run(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _record(env, job_id: str) -> dict:
    return json.loads((Path(env["NEMORUN_HOME"]) / "a3po_jobs" / f"{job_id}.json").read_text())


def _job_id(out: str) -> str:
    m = re.findall(r"\[launch\] submitted Slurm job (\d+)", out)
    assert m, out[-3000:]
    return m[-1]


def _queued(env, job_id: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
    return bool(r.stdout.strip())


def _job_processes(job_id: str) -> list[str]:
    """Processes whose environment says they belong to Slurm job ``job_id`` (any het component)."""
    ids = {job_id, str(int(job_id) + 1)}  # the het job's components have consecutive ids
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = p.joinpath("environ").read_bytes().split(b"\0")
            cmd = p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        vals = {e.split(b"=", 1)[1].decode() for e in env
                if e.startswith((b"SLURM_JOB_ID=", b"SLURM_JOBID=", b"SLURM_HET_JOB_ID="))}
        if vals & ids:
            found.append(f"{p.name}: {cmd[:200]}")
    return found


def _wait_gone(env, job_id: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _job_processes(job_id)
        if not _queued(env, job_id) and not left:
            return []
        time.sleep(1)
    return _job_processes(job_id) or ["job still queued"]


def _steps(run_dir: Path) -> list[dict]:
    p = run_dir / "steps.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def _logs(rec: dict, group: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(Path(rec["job_dir"]).glob(f"log-*-{group}_*.out")))


def _both_logs(env, job_id: str) -> str:
    rec = _record(env, job_id)
    trainer = _logs(rec, 0)
    errors = "\n".join(ln for ln in trainer.splitlines() if ln.startswith("error:"))  # the trainer's own
    return f"trainer errors:\n{errors}\ntrainer:\n{trainer[-3000:]}\nfleet:\n{_logs(rec, 1)[-3000:]}"


@pytest.mark.slow
def test_het_job_cancel_resume_and_full_run(slurm, work):
    """Submit (detached), scancel mid-run, resubmit into the same run dir and wait for it to finish.

    The cluster file's recipe sections reach the trainer as the launcher validated them (issue 24): a
    list of strings, one of them numeric (``rollout.engine_args``, passed verbatim to every engine), made
    the trainer's recipe invalid once the launcher had re-encoded it as dotted overrides. Both jobs run
    with such a file; the engines got the flags."""
    import yaml

    env = slurm
    run_dir = work / "run"
    steps = 8
    common = [f"trainer.log_dir={run_dir}", f"trainer.steps={steps}", "trainer.warm_start_steps=0",
              "trainer.save_every=2", "trainer.resume=true"]
    raw = yaml.safe_load((REPO / CLUSTER_FILE).read_text())
    # a flag the CPU engine has (SGLang's own, e.g. --chunked-prefill-size 4096, it would refuse); the
    # default value, so the run is the recipe's
    raw["rollout"]["engine_args"] = ["--max-n", "64"]
    cf = work / "cluster.yaml"
    cf.write_text(yaml.safe_dump(raw))

    # 1. detached submission: the job id comes back at once
    r = _launch(env, *common, detach=True, timeout=600, cluster=cf)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job1 = r.stdout.strip().splitlines()[-1]
    assert job1.isdigit() and job1 == _job_id(r.stdout)

    # 2. cancel once a checkpoint exists and the trainer is past it
    deadline = time.monotonic() + 900
    while not (len(_steps(run_dir)) >= 3 and (run_dir / "checkpoints" / "latest").exists()):
        assert _queued(env, job1), "job 1 ended before it was cancelled:\n" + _both_logs(env, job1)
        assert time.monotonic() < deadline, "no checkpoint after 900 s:\n" + _both_logs(env, job1)
        time.sleep(1)
    subprocess.run(["scancel", job1], env=env, check=True)
    left = _wait_gone(env, job1)
    assert left == [], f"processes of cancelled job {job1} left: {left}"
    ckpt = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt_step = int(re.findall(r"\d+", ckpt)[-1])
    n_before = len(_steps(run_dir))
    assert 2 <= ckpt_step <= n_before < steps

    # 3. resubmission into the same run dir, waited for: exit 0, resumes after the checkpoint
    r = _launch(env, *common, cluster=cf)
    out = r.stdout + r.stderr
    job2 = _job_id(r.stdout)
    assert r.returncode == 0, out[-5000:] + "\n" + _both_logs(env, job2)
    assert job2 != job1
    rec = _record(env, job2)
    tlog, flog = _logs(rec, 0), _logs(rec, 1)
    trained = [int(k) for k in re.findall(r"megatron_a3po\.trainer: step (\d+) v\d+ reward", tlog)]
    assert trained and trained[0] == ckpt_step + 1, (ckpt_step, trained, tlog[-3000:])
    assert trained == list(range(ckpt_step + 1, steps + 1))
    recs = _steps(run_dir)  # one history: the records after the checkpoint were replaced by the rerun's
    assert [x["step"] for x in recs] == list(range(1, steps + 1))
    second = recs[ckpt_step:]

    # versions advance one per step; the staleness bound held on every trained token
    for x in second:
        assert x["version_after"] == x["version_trained"] + 1
        assert x["version_trained"] == x["step"] - 1
        assert x["stats"]["staleness/max"] <= MAX_STALENESS, x["stats"]
    assert len(set(g for x in second for g in x["group_ids"])) == sum(len(x["group_ids"]) for x in second)

    # placement: trainer ranks on n1/n2 (het group 0), engines on n3/n4 (group 1)
    ranks = dict(re.findall(r"rank (\d) of 2 on node (n\d)", tlog))
    assert ranks == {"0": "n1", "1": "n2"}, tlog[-3000:]
    engines = dict(re.findall(r"\[launch\.supervisor\] node \d \((n\d)\): engine (\d)", flog))
    assert sorted(engines.items()) == [("n3", "0"), ("n4", "1")], flog[-3000:]
    cmds = re.findall(r"\[launch\.supervisor\] node \d \(n\d\): engine \d: (.*)", flog)
    assert len(cmds) == 2 and all(cmd.endswith(" --max-n 64") for cmd in cmds), flog[-3000:]
    assert "sglang_router.launch_router" in flog

    # generation went through the router to both engines: each engine's request log has entries, and
    # the trainer was given the router (not the engines) to generate with
    assert re.search(r"rollout\.router_url=http://127\.0\.0\.1:\d+", tlog)
    for i in (0, 1):
        served = [ln for ln in (Path(rec["job_dir"]) / f"engine-{i}.jsonl").read_text().splitlines() if ln]
        assert served, f"engine {i} served no request"

    # launch.status shows the finished job and its logs
    s = subprocess.run([sys.executable, "-m", "launch.status", job2], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0 and f"job {job2}" in s.stdout and "trainer exit status: 0" in s.stdout, s.stdout
    assert _job_processes(job2) == []


@pytest.mark.slow
def test_trainer_failure_fails_the_launch(slurm, work):
    """A bad setting that only the trainer catches (a resume dir that does not exist): launch.run exits
    non-zero with the trainer's error, and no process of the job (the fleet) is left."""
    env = slurm
    missing = work / "no_such_checkpoints"
    r = _launch(env, f"trainer.log_dir={work / 'run'}", "trainer.steps=2", "trainer.resume=true",
                f"trainer.save_dir={missing}", timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert f"trainer.save_dir={missing} does not exist" in out, out[-3000:]
    job = _job_id(r.stdout)
    assert not _queued(env, job)
    assert _wait_gone(env, job, timeout=30) == []
