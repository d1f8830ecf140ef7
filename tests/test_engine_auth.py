"""API keys on the CPU engine (SGLang 0.5.23's levels, see megatron_a3po/engine/auth.py) and the
weights root of /update_weights_from_disk. In-process: the app over one Engine, through Starlette's
test client."""

import pytest
from starlette.testclient import TestClient

from rollout_util import model_dirs

OPEN = ("/health", "/health_generate", "/ready")


@pytest.fixture(scope="module")
def app_for(tmp_path_factory):
    from megatron_a3po.engine.server import Engine, build_app, parse_args

    root = tmp_path_factory.mktemp("auth")
    d = model_dirs(root / "weights", 2, "qwen2")
    made = []

    def make(*flags):
        eng = Engine(parse_args(["--model-path", d[0], "--context-length", "64", *flags]))
        made.append(eng)
        return TestClient(build_app(eng)), d, root

    yield make
    for e in made:
        e.sched.stop()


def _routes(client):
    """Every (method, path) of the app but the open ones, from its OpenAPI document (FastAPI >= 0.16x
    keeps an included router's routes inside it, not in ``app.routes``)."""
    for path, ops in client.app.openapi()["paths"].items():
        for m in sorted(ops):
            if m.upper() in ("GET", "POST") and not path.startswith(OPEN):
                yield m.upper(), path


def test_with_a_key_every_route_but_health_needs_it(app_for, monkeypatch):
    monkeypatch.setenv("A3PO_API_KEY", "k-123")  # read from the environment, as launch/ hands it over
    client, d, _ = app_for()
    routes = list(_routes(client))
    assert ("POST", "/update_weights_from_disk") in routes and ("POST", "/generate") in routes
    for m, path in routes:
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-123"}):
            r = client.request(m, path, json={}, headers=hdr)
            assert r.status_code == 401, (m, path, hdr, r.status_code)
    for path in OPEN:
        assert client.get(path).status_code != 401
    ok = {"Authorization": "Bearer k-123"}
    r = client.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}, headers=ok)
    assert r.status_code == 200, r.text
    assert client.post("/update_weight_version", json={"new_version": "7"}, headers=ok).status_code == 200


def test_admin_key_guards_control_routes(app_for, monkeypatch):
    monkeypatch.setenv("A3PO_API_KEY", "user")
    monkeypatch.setenv("A3PO_ADMIN_API_KEY", "admin")
    client, _, _ = app_for()
    user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
    for path in ("/update_weight_version", "/pause_generation", "/update_weights_from_disk"):
        assert client.post(path, json={}, headers=user).status_code == 401, path
    assert client.post("/update_weight_version", json={"new_version": "1"}, headers=admin).status_code == 200
    assert client.get("/model_info", headers=user).status_code == 200  # a normal route: the api key
    assert client.get("/model_info", headers=admin).status_code == 401


def test_update_weights_from_disk_reads_only_below_the_weights_root(app_for, monkeypatch, tmp_path):
    monkeypatch.delenv("A3PO_API_KEY", raising=False)
    monkeypatch.delenv("A3PO_ADMIN_API_KEY", raising=False)
    client, d, root = app_for()  # default root: the model's parent directory
    import shutil

    outside = tmp_path / "other_run"
    shutil.copytree(d[1], outside)
    (root / "weights" / "escape").symlink_to(outside)
    for path in (outside, root / "weights" / "escape", root / "weights" / ".." / ".." / tmp_path.name):
        r = client.post("/update_weights_from_disk", json={"model_path": str(path), "weight_version": "evil"})
        assert r.status_code == 400 and "weights root" in r.json()["message"], (path, r.text)
    assert client.get("/model_info").json()["weight_version"] != "evil"
    r = client.post("/update_weights_from_disk", json={"model_path": d[1], "weight_version": "2"})
    assert r.status_code == 200, r.text
    assert client.get("/model_info").json()["weight_version"] == "2"
