"""Wait until every URL answers ``GET /health`` with 200, then run a command (the trainer).

    python -m launch.health --url http://h:30000 --url http://h:30080 --timeout 3600 \
        [--stop-file F] [--expand-env] -- torchrun ... '--node-rank=$SLURM_NODEID' -m megatron_a3po.trainer ...

Exit status: the command's; 3 when a server did not become healthy in time (nothing is started).
With ``--stop-file`` the file is created when the command ends, holding its exit status; it tells
``launch.supervisor`` to stop its servers (local launches; on Slurm the job ends anyway).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(urls: list[str], timeout_s: float, poll_s: float = 2.0) -> list[str]:
    """Poll until all ``urls`` are healthy; returns the ones still down at the deadline ([] = all up)."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    while pending:
        pending = [u for u in pending if not healthy(u)]
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            return pending
        if now - last_report > 60:
            print(f"[launch.health] waiting for {len(pending)} server(s): {', '.join(pending)}", flush=True)
            last_report = now
        time.sleep(poll_s)
    return []


def split_command(argv=None) -> tuple[list[str], list[str]]:
    """``OPTIONS -- COMMAND...`` -> (options, command); the command is [] without ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv=None) -> int:
    argv, cmd = split_command(argv)
    ap = argparse.ArgumentParser(prog="python -m launch.health", description=__doc__.splitlines()[0])
    ap.add_argument("--url", action="append", default=[], help="server base URL (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for all servers")
    ap.add_argument("--stop-file", default=None, help="created when the command ends")
    ap.add_argument("--expand-env", action="store_true", help="expand $VAR in the command from this process's "
                    "environment (per-task values such as $SLURM_NODEID, which the sbatch script cannot know)")
    args = ap.parse_args(argv)
    if not cmd:
        ap.error("no command after --")
    if args.expand_env:
        missing = sorted({m for a in cmd for m in re.findall(r"\$\{?(\w+)", a) if m not in os.environ})
        if missing:
            ap.error(f"--expand-env: {', '.join(missing)} not set in this environment")
        cmd = [os.path.expandvars(a) for a in cmd]
    code = 1
    try:
        down = wait_healthy(args.url, args.timeout)
        if down:
            print(f"[launch.health] not healthy after {args.timeout:.0f}s: {', '.join(down)}", file=sys.stderr)
            code = 3
            return code
        print(f"[launch.health] {len(args.url)} server(s) healthy; starting: {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd)
        return code
    finally:
        if args.stop_file:  # holds the command's exit status (the local launcher reports it)
            stop = Path(args.stop_file)
            stop.parent.mkdir(parents=True, exist_ok=True)
            tmp = stop.with_name(stop.name + ".tmp")
            tmp.write_text(f"{code}\n")
            tmp.replace(stop)


if __name__ == "__main__":
    sys.exit(main())
