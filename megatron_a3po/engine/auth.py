"""API keys of the CPU engine, with SGLang 0.5.23's semantics (``--api-key``, ``--admin-api-key``).

Each route has a level. NORMAL routes need the api key when one is set. ADMIN_OPTIONAL routes (weight
updates, pause/continue, version changes, the debug routes) are open when no key is set, need the admin
key when one is set, else the api key. /health*, /ready* and /metrics* are always open. A missing or
wrong key is 401 ``{"error": "Unauthorized"}``. Keys are compared in constant time and are read from the
environment ($A3PO_API_KEY, $A3PO_ADMIN_API_KEY) unless given as flags (which ``ps`` would show).
"""

from __future__ import annotations

import json
import secrets

NORMAL, ADMIN_OPTIONAL = "normal", "admin_optional"
OPEN_PREFIXES = ("/health", "/ready", "/metrics")
ADMIN_OPTIONAL_ROUTES = {
    "/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
    "/update_weights_from_tensor", "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update",
    "/update_weight_version", "/pause_generation", "/continue_generation", "/flush_cache", "/abort_request",
    "/slow_down",
}


def route_level(path: str) -> str:
    return ADMIN_OPTIONAL if path in ADMIN_OPTIONAL_ROUTES or path.startswith("/debug/") else NORMAL


def _bearer_matches(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())


def allowed(path: str, authorization: str | None, api_key: str | None, admin_key: str | None) -> bool:
    if path.startswith(OPEN_PREFIXES):
        return True
    if route_level(path) == ADMIN_OPTIONAL:
        need = admin_key or api_key
    else:
        need = api_key
    return need is None or _bearer_matches(authorization, need)


class KeyMiddleware:
    """Pure ASGI (a client disconnect still reaches the handlers, which abort its requests)."""

    def __init__(self, app, *, api_key: str | None, admin_key: str | None):
        self.app, self.api_key, self.admin_key = app, api_key or None, admin_key or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        authz = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                authz = v.decode("latin-1")
                break
        if allowed(scope.get("path", ""), authz, self.api_key, self.admin_key):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
