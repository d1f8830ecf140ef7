"""Fuzz a running CPU engine over HTTP with schemathesis, from the engine's own OpenAPI document.

    python tests/engine_fuzz.py --url http://127.0.0.1:PORT [--schema-url URL] [--examples 200] [--seconds 600]

(the longer run of docs/rollout.md; the suite runs ``fuzz`` briefly in tests/test_engine_hardening.py).
Every operation gets ``examples`` positive (schema-valid) and as many negative (schema-violating) bodies;
a reply of 5xx, a dropped connection or a request that takes longer than ``request_timeout`` is a
finding. ``/pause_generation`` is left out: a paused engine holds /generate by design (as SGLang).
"""

from __future__ import annotations

import argparse
import json
import time

SKIP = {("POST", "/pause_generation")}


def fuzz(url: str, *, schema_url: str | None = None, examples: int = 20, seconds: float = 60.0,
         request_timeout: float = 30.0, headers: dict | None = None, seed: int = 0) -> list[dict]:
    """Returns the findings: [{"op", "status" or "error", "body"}]; stops adding cases after ``seconds``."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url((schema_url or url) + "/openapi.json")
    findings: list[dict] = []
    deadline = time.monotonic() + seconds
    session = requests.Session()
    ops = [r.ok() for r in schema.get_all_operations()]
    # /generate first, /continue_generation last (undoes nothing we sent, but keeps the engine serving)
    ops.sort(key=lambda op: (op.path != "/generate", op.path == "/continue_generation", op.method, op.path))
    for op in ops:
        if (op.method.upper(), op.path) in SKIP:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception:  # noqa: BLE001 - no negative variant for a body-less GET
                continue

            @hseed(seed)
            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def one(case):
                if time.monotonic() > deadline:
                    return
                body = getattr(case, "body", None)
                try:
                    r = case.call(base_url=url, session=session, headers=headers, timeout=request_timeout)
                except Exception as e:  # noqa: BLE001 - timeout, dropped connection
                    findings.append({"op": f"{op.method.upper()} {op.path}", "mode": mode.value,
                                     "error": f"{type(e).__name__}: {str(e)[:200]}", "body": _short(body)})
                    return
                if r.status_code >= 500:
                    findings.append({"op": f"{op.method.upper()} {op.path}", "mode": mode.value,
                                     "status": r.status_code, "reply": r.text[:200], "body": _short(body)})

            try:
                one()
            except Unsatisfiable:  # nothing to generate in this mode (e.g. a GET without parameters)
                pass
    return findings


def _short(body) -> str:
    try:
        s = json.dumps(body)
    except (TypeError, ValueError):
        s = repr(body)
    return s if len(s) <= 300 else s[:300] + "..."


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--schema-url", default=None, help="take the OpenAPI document from here (default --url)")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    a = ap.parse_args()
    hdrs = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    found = fuzz(a.url, schema_url=a.schema_url, examples=a.examples, seconds=a.seconds, headers=hdrs)
    for f in found:
        print(json.dumps(f))
    print(f"{len(found)} finding(s)")
    raise SystemExit(1 if found else 0)
