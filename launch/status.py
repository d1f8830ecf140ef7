"""Status and logs of a Slurm job submitted by ``launch.run``.

    python -m launch.status JOB_ID            # state, log files, the last lines of each group's log
    python -m launch.status JOB_ID --follow   # stream the logs until the job ends; exit with the trainer's status
    python -m launch.status JOB_ID --lines 200

JOB_ID is what ``launch.run --detach`` printed (or the experiment directory). ``launch.run`` records each
submission in ``$NEMORUN_HOME/experiments/<title>/<id>/a3po_job.json``: the job id, nemo-run's job
directory (sbatch script, ``log-*-0_*.out`` = het group 0 = trainer, ``log-*-1_*.out`` = group 1 = fleet),
the file in which ``launch.health`` leaves the trainer's exit status, and the trainer's run dir.
Slurm is asked with ``squeue`` / ``scontrol`` (on the login node with ``--ssh`` submissions); no
accounting database (``sacct``) is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 2.0


def _home() -> Path:
    return Path(os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")))


def index_path(job_id: str) -> Path:
    return _home() / "a3po_jobs" / f"{job_id}.json"


def find(ref: str) -> dict:
    """The record of job ``ref`` (a job id or an experiment directory)."""
    p = Path(ref)
    if (p / "a3po_job.json").is_file():
        return json.loads((p / "a3po_job.json").read_text())
    if index_path(ref).is_file():
        return json.loads(index_path(ref).read_text())
    for f in sorted((_home() / "experiments").glob("*/*/a3po_job.json"), key=lambda f: f.stat().st_mtime,
                    reverse=True):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if str(rec.get("job_id")) == ref:
            return rec
    raise SystemExit(f"error: no job {ref!r} submitted by launch.run under {_home() / 'experiments'} "
                     "(set NEMORUN_HOME as at submission)")


def _sh(rec: dict, cmd: str) -> subprocess.CompletedProcess:
    argv = ["ssh", rec["ssh"], cmd] if rec.get("ssh") else ["bash", "-c", cmd]
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def job_states(rec: dict) -> list[str]:
    """States of the job's het components while Slurm lists it in its queue ([] once it left)."""
    r = _sh(rec, f"squeue -h -j {shlex.quote(str(rec['job_id']))} -o %T")
    return r.stdout.split() if r.returncode == 0 else []


def final_state(rec: dict) -> str:
    r = _sh(rec, f"scontrol show job {shlex.quote(str(rec['job_id']))} -o")
    states = sorted({w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")})
    return ",".join(states) or "UNKNOWN (no longer known to slurmctld)"


def log_files(rec: dict) -> dict[str, list[str]]:
    d = shlex.quote(rec["job_dir"])
    r = _sh(rec, f"cd {d} 2>/dev/null && ls -1 log-*.out sbatch_*.out engine-*.jsonl 2>/dev/null")
    names = r.stdout.split()
    pick = lambda pred: [os.path.join(rec["job_dir"], n) for n in sorted(names) if pred(n)]  # noqa: E731
    return {"trainer": pick(lambda n: n.startswith("log-") and "-0_" in n),
            "fleet": pick(lambda n: n.startswith("log-") and "-1_" in n),
            "sbatch": pick(lambda n: n.startswith("sbatch_")),
            "engines": pick(lambda n: n.startswith("engine-"))}


def _read(rec: dict, path: str, offset: int = 0) -> str:
    return _sh(rec, f"tail -c +{offset + 1} {shlex.quote(path)} 2>/dev/null").stdout


def tail(rec: dict, path: str, lines: int) -> str:
    return _sh(rec, f"tail -n {int(lines)} {shlex.quote(path)} 2>/dev/null").stdout


def trainer_status(rec: dict) -> int | None:
    """The trainer's exit status that launch.health left in the job directory (None: it never ended)."""
    r = _sh(rec, f"cat {shlex.quote(rec['stop_file'])} 2>/dev/null")
    try:
        return int(r.stdout.strip())
    except ValueError:
        return None


def show(rec: dict, lines: int = 40) -> int:
    states = job_states(rec)
    print(f"job {rec['job_id']} ({rec['title']}): {','.join(sorted(set(states))) if states else final_state(rec)}")
    print(f"  job dir  {rec['job_dir']}")
    print(f"  run dir  {rec['run_dir']} (steps.jsonl, tb/, checkpoints/)")
    files = log_files(rec)
    for group in ("trainer", "fleet"):
        for f in files[group]:
            print(f"\n==> {group}: {f} (last {lines} lines) <==")
            print(tail(rec, f, lines), end="")
    code = trainer_status(rec)
    if code is not None:
        print(f"\ntrainer exit status: {code}")
    return 0


def wait(rec: dict, *, stream: bool = True, fail_lines: int = 60) -> int:
    """Follow the job until Slurm no longer lists it; stream its logs; return the trainer's status
    (1 when the job ended without one: cancelled, timed out, or the trainer never started)."""
    offsets: dict[str, int] = {}
    partial: dict[str, str] = {}

    def pump():
        files = log_files(rec)
        for group in ("trainer", "fleet"):
            for f in files[group]:
                text = _read(rec, f, offsets.get(f, 0))
                if not text:
                    continue
                offsets[f] = offsets.get(f, 0) + len(text.encode())
                buf = partial.get(f, "") + text
                *done, partial[f] = buf.split("\n")
                if stream:
                    for ln in done:
                        print(f"[{group}] {ln}", flush=True)

    while True:
        states = job_states(rec)
        if stream:
            pump()
        if not states:
            break
        time.sleep(POLL_S)
    if stream:
        pump()
    code = trainer_status(rec)
    if code is None:
        print(f"[launch] job {rec['job_id']} ended ({final_state(rec)}) without a trainer exit status",
              file=sys.stderr, flush=True)
        code = 1
    elif code != 0:
        print(f"[launch] the trainer exited with status {code}", file=sys.stderr, flush=True)
    if code != 0:
        for f in log_files(rec)["trainer"]:
            print(f"[launch] last lines of {f}:\n{tail(rec, f, fail_lines)}", file=sys.stderr, flush=True)
    else:
        print(f"[launch] job {rec['job_id']} finished; the trainer exited with status 0", flush=True)
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.splitlines()[0])
    ap.add_argument("job", help="job id printed by launch.run (or its experiment directory)")
    ap.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with the "
                                                          "trainer's status")
    ap.add_argument("--lines", type=int, default=40)
    args = ap.parse_args(argv)
    rec = find(args.job)
    return wait(rec) if args.follow else show(rec, args.lines)


if __name__ == "__main__":
    sys.exit(main())
