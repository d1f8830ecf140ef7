"""scripts/gpu_smoke.sh's CPU-checkable parts: argument handling, and --dry-run printing every command with
each command's flags checked against the installed tools' --help and the trainer's overrides against the
recipe schema. (The smoke run itself needs a GPU.)"""

import subprocess
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run(["bash", "scripts/gpu_smoke.sh", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,msg", [(["--steps", "x"], "positive integer"), (["--steps", "0"], ">= 1"),
                                      (["--bogus"], "unknown argument"), (["--model"], "needs a directory"),
                                      (["--model", "/nonexistent"], "no config.json")])
def test_bad_arguments_exit_2_with_a_message(args, msg):
    r = _run(*args)
    assert r.returncode == 2 and msg in r.stderr, (r.returncode, r.stderr)


def test_dry_run_prints_and_checks_every_command():
    r = _run("--dry-run", "--steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    cmds = [l for l in r.stdout.splitlines() if l.startswith("+ ")]
    assert len(cmds) == 5
    assert any("megatron_a3po.trainer" in c and "trainer.steps=2" in c for c in cmds)
    assert any("bench.loss" in c for c in cmds)
    assert r.stdout.count("ok: flags exist") >= 3 and "ok: recipe overrides are valid" in r.stdout
    assert "UNKNOWN" not in r.stdout and "BAD" not in r.stdout
