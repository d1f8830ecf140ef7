"""The API key shared by a run's rollout servers and the trainer's client.

The key travels in the environment (``A3PO_API_KEY``; an admin key for control routes in
``A3PO_ADMIN_API_KEY``), never on a command line that ``ps`` shows: launch/ generates one per job, the
trainer generates one for the CPU engines it starts itself, engines read it at start, the client sends
it as ``Authorization: Bearer KEY`` (as SGLang's ``--api-key`` / ``--admin-api-key`` expect).
"""

from __future__ import annotations

import os
import secrets

API_KEY_ENV = "A3PO_API_KEY"
ADMIN_API_KEY_ENV = "A3PO_ADMIN_API_KEY"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def auth_headers(key: str | None = None) -> dict[str, str]:
    """Headers for a request to a rollout server: ``key``, else $A3PO_API_KEY, else none. (A run uses
    one api key for every route; a server that also has an admin key wants that one on control routes.)"""
    key = key or os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}
