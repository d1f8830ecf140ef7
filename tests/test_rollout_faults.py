"""Fault injection on real engine processes: a killed engine, one answering 503 for a while, one hanging
past the request timeout; and a weight update failing on one server."""

import threading
import time

import httpx
import pytest

from megatron_a3po.engine.launch import launch_engines
from megatron_a3po.rollout import ControllerConfig, RolloutManager, WeightUpdateError
from megatron_a3po.rollout.cursor import PromptCursor
from rollout_util import check_versions_against_logs, hf_tensors, model_dirs, read_version_logs, toy_prompts, toy_task, tokenizer

pytestmark = pytest.mark.slow
GROUPS = 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return model_dirs(tmp_path_factory.mktemp("faults"), 2)


def _fault(url, **body):
    r = httpx.post(f"{url}/debug/fault", json=body, timeout=10)
    assert r.status_code == 200, r.text


def test_killed_503_and_hanging_engines(dirs, tmp_path):
    eps = launch_engines(dirs[0], n=3, version="0", test_hooks=True, version_log=tmp_path / "v-{port}.jsonl")
    prompts = toy_prompts(300)
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=6, batch_groups=GROUPS, max_staleness=2,
                           max_new_tokens=16, seed=1)
    rm = RolloutManager([e.url for e in eps], prompts, toy_task(), tokenizer(), cfg, request_timeout=4.0,
                        health_interval_s=0.3)
    rm.fleet.health_timeout = 1.0
    delivered = []
    try:
        rm.start()
        for v in range(7):
            if v == 1:
                _fault(eps[1].url, mode="503", duration_s=3)
            if v == 2:
                _fault(eps[2].url, mode="hang", duration_s=8)  # past the request timeout
            if v == 3:  # crash engine 0 while a batch is being generated
                threading.Timer(0.3, eps[0].kill).start()
            batch = rm.get_batch(GROUPS, v, timeout=120)
            delivered += batch.samples
            rm.update_weights(v + 1, hf_dir=dirs[(v + 1) % 2])
        deadline = time.time() + 60  # the 503 and the hung server come back once their fault is over
        while time.time() < deadline and any(s.state != "up" for s in rm.fleet.servers[1:]):
            time.sleep(0.2)
        m = rm.metrics()
        sd = rm.state_dict()
        events = list(rm.fleet.events)
    finally:
        rm.close()
        for e in eps:
            e.stop()
    assert not eps[0].alive()
    assert m["rollout/servers_dropped"] == 1 and m["rollout/servers_live"] == 2
    assert m["rollout/http_5xx"] >= 1
    assert m["rollout/timeouts"] >= 1
    ev = {e.url: [x for _, u, x in events if u == e.url] for e in eps}
    assert any(x.startswith("dropped") for x in ev[eps[0].url]), events
    assert any("HTTP 503" in x for x in ev[eps[1].url]) and "recovered" in ev[eps[1].url], events
    assert any("timed out" in x for x in ev[eps[2].url]) and "recovered" in ev[eps[2].url], events
    assert m["rollout/retries"] >= 2
    # every prompt group accounted for: delivered once, or pending (to be regenerated)
    got = [s.prompt_index for s in delivered if s.sample_index == 0]
    assert len(got) == len(set(got)) == 7 * GROUPS
    assert not set(got) & set(sd["pending"])
    order = PromptCursor(len(prompts), seed=1)._epoch_order(0)
    assert set(got) | set(sd["pending"]) == set(order[:sd["pos"]])
    check_versions_against_logs(delivered, read_version_logs([e.version_log for e in eps]))


def _state(url):
    info = httpx.get(f"{url}/server_info", timeout=10).json()
    return info["internal_states"][0]["paused"], httpx.get(f"{url}/model_info", timeout=10).json()["weight_version"]


def test_weight_update_failure_retried_then_clear_error(dirs):
    eps = launch_engines(dirs[0], n=2, version="0", test_hooks=True)
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=4, batch_groups=2, max_staleness=1, max_new_tokens=8)
    rm = RolloutManager([e.url for e in eps], toy_prompts(100), toy_task(), tokenizer(), cfg)
    try:
        rm.start()
        rm.get_batch(2, 0, timeout=60)
        _fault(eps[1].url, mode="fail_update", count=1)  # fails once: the retry succeeds
        rm.update_weights(1, hf_dir=dirs[1])
        assert rm.metrics()["rollout/control_retries"] >= 1
        assert [_state(e.url) for e in eps] == [(False, "1"), (False, "1")]
        rm.get_batch(2, 1, timeout=60)

        _fault(eps[1].url, mode="fail_update", count=100)  # fails every retry
        with pytest.raises(WeightUpdateError, match=r"version 2 failed.*update_weights_from_disk.*paused"):
            rm.update_weights(2, hf_dir=dirs[0])
        # no server serves mixed weights: both are paused (engine 0 already has v2, engine 1 still v1)
        assert [_state(e.url) for e in eps] == [(True, "2"), (True, "1")]
        time.sleep(0.5)
        assert [_state(e.url)[0] for e in eps] == [True, True]
        with pytest.raises(WeightUpdateError):
            rm.get_batch(2, 2, timeout=10)
        assert rm.metrics()["rollout/weight_update_failures"] == 1

        _fault(eps[1].url, mode="none")
        rm.update_weights(2, hf_dir=dirs[0])
        assert [_state(e.url) for e in eps] == [(False, "2"), (False, "2")]
        b = rm.get_batch(2, 2, timeout=60)
        assert all(2 - min(s.versions) <= 1 for s in b.samples)
    finally:
        rm.close()
        for e in eps:
            e.stop()


def test_close_ends_the_servers_side_of_inflight_requests(dirs):
    """Stopping the controller aborts its requests on the servers (a paused engine would otherwise keep
    them, and a real fleet would keep generating for nobody), so shutdown leaves nothing queued."""
    eps = launch_engines(dirs[0], n=1, version="0")
    url = eps[0].url
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=6, batch_groups=2, max_staleness=2,
                           max_new_tokens=16, seed=1)
    rm = RolloutManager([url], toy_prompts(50), toy_task(), tokenizer(), cfg, request_timeout=60.0)

    def queued():
        info = httpx.get(f"{url}/get_server_info", timeout=10).json()["internal_states"][0]
        return info["num_running"] + info["num_waiting"]

    try:
        r = httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=10)
        assert r.status_code == 200, r.text
        rm.start()  # its requests queue up in the paused engine
        deadline = time.time() + 30
        while queued() == 0 and time.time() < deadline:
            time.sleep(0.1)
        assert queued() > 0
        rm.close()
        assert queued() == 0
    finally:
        rm.close()
        for e in eps:
            e.stop()


def _digest_of_dir(d):
    """Independent of the engine: the HF files, read with safetensors."""
    from megatron_a3po.convert.digest import state_digest

    return state_digest(hf_tensors(d).items())


def _wait_event(rm, url, text, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(u == url and text in x for _, u, x in list(rm.fleet.events)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} event for {url} within {timeout}s: {rm.fleet.events}")


def test_kill_restart_stop_and_lose_all_engines_behind_the_real_router(dirs, tmp_path):
    """Two CPU engines behind sglang-router 0.3.2: SIGKILL one mid-run (it leaves the router, generation
    goes on), restart it (synced to the served weights before it serves), SIGSTOP the other past the hang
    timeout (dropped, updates go on with the healthy one, which is never marked unavailable), SIGCONT it
    (synced before it serves), then kill both (a clear error naming the logs, once)."""
    import os
    import signal

    pytest.importorskip("sglang_router")
    from megatron_a3po.engine.launch import launch_engine
    from megatron_a3po.rollout import RolloutError
    from megatron_a3po.rollout.router import router_workers, start_router

    HANG = 3.0
    logs = tmp_path / "logs"
    eps = launch_engines(dirs[0], n=2, version="0", test_hooks=True, version_log=tmp_path / "v-{port}.jsonl",
                         log_dir=logs, timeout=300)  # a loaded 2-core machine starts an engine in ~1 min
    rp = start_router([e.url for e in eps], log_path=logs / "router.log")
    prompts = toy_prompts(300)
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=6, batch_groups=GROUPS, max_staleness=2,
                           max_new_tokens=16, seed=1)
    rm = RolloutManager([e.url for e in eps], prompts, toy_task(), tokenizer(), cfg, router_url=rp.url,
                        request_timeout=60.0, health_interval_s=0.3, hang_timeout_s=HANG,
                        log_hints={e.url: e.log_path for e in eps})
    delivered, restarted, admitted_at_end = [], None, None
    a, b = eps
    served = {0: dirs[0]}
    try:
        rm.start()
        v = 0

        def step():
            nonlocal v
            batch = rm.get_batch(GROUPS, v, timeout=120)
            delivered.extend(batch.samples)
            assert all(v - min(s.versions) <= cfg.max_staleness for s in batch.samples)
            served[v + 1] = dirs[(v + 1) % 2]
            rm.update_weights(v + 1, hf_dir=served[v + 1])
            v += 1

        step()
        threading.Timer(0.3, a.kill).start()  # SIGKILL engine a while a batch is generated
        t_kill = time.time()
        step()
        deadline = t_kill + 15
        while a.url in {w["url"] for w in router_workers(rp.url)}:
            assert time.time() < deadline, "the killed worker is still registered with the router after 15 s"
            time.sleep(0.2)
        step()
        # restart a on its port: it rejoins only once it serves the current weights
        restarted = launch_engine(dirs[0], port=a.port, version="0", test_hooks=True,
                                  version_log=tmp_path / "v-{port}.jsonl", log_dir=logs, timeout=300)
        _wait_event(rm, a.url, "rejoined", 120)
        assert httpx.get(f"{a.url}/model_info").json()["weight_version"] == str(v)
        assert httpx.get(f"{a.url}/weights_digest").json()["digest"] == _digest_of_dir(served[v])
        assert a.url in {w["url"] for w in router_workers(rp.url)}
        step()
        # SIGSTOP b for longer than the hang timeout: dropped; generation and updates go on with a
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            step()
            _wait_event(rm, b.url, "hung", 3 * HANG + 5)
            step()
            step()
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        _wait_event(rm, b.url, "rejoined", 120)
        assert httpx.get(f"{b.url}/model_info").json()["weight_version"] == str(v)
        assert httpx.get(f"{b.url}/weights_digest").json()["digest"] == _digest_of_dir(served[v])
        step()
        ev = [(u, x) for _, u, x in rm.fleet.events]
        # the healthy engine (a, since its restart) was never marked unavailable because b hung
        after_restart = [x for u, x in ev if u == a.url][[x for u, x in ev if u == a.url].index(
            "rejoined (synced to the current weights)") + 1:]
        assert not [x for x in after_restart if x.startswith(("unavailable", "hung", "dropped"))], ev
        # every engine gone: a clear error, once, naming the logs and what to do
        restarted.kill()
        b.kill()
        with pytest.raises(RolloutError) as ei:
            for _ in range(3):
                step()
        msg = str(ei.value)
        assert "trainer.resume=true" in msg and all(e.log_path in msg for e in eps), msg
        m = rm.metrics()
        sd = rm.state_dict()
        admitted_at_end = m["rollout/groups_admitted"]
    finally:
        rm.close()
        rp.stop()
        for e in eps + ([restarted] if restarted else []):
            e.stop()
    assert m["rollout/servers_dropped"] >= 1 and m["rollout/servers_hung"] >= 1
    assert m["rollout/servers_rejoined"] >= 2
    # no group lost or delivered twice: delivered once, or pending (regenerated after a resume)
    got = [s.group_id for s in delivered if s.sample_index == 0]
    assert len(got) == len(set(got))
    idx = [s.prompt_index for s in delivered if s.sample_index == 0]
    assert not set(idx) & set(sd["pending"])
    order = PromptCursor(len(prompts), seed=1)._epoch_order(0)
    assert set(idx) | set(sd["pending"]) == set(order[:sd["pos"]])
    assert admitted_at_end >= len(got)
    check_versions_against_logs(delivered, read_version_logs([e.version_log for e in eps]))



def test_trainer_behind_the_real_router_kill_restart_stop_then_lose_all_engines(tmp_path):
    """The real training loop (trainer CLI, two CPU engines behind sglang-router, hang timeout 5 s):
    SIGKILL engine A mid-run (training goes on); restart it on its port (it serves only once synced to
    the trainer's version); SIGSTOP engine B for 20 s (dropped within the timeout; no step meanwhile
    takes longer than the timeout plus a normal step; A is never marked unavailable); SIGCONT (B synced
    before it serves); then kill both: one clear error naming the engines' logs and trainer.resume=true.
    Throughout: no group trained twice, the staleness bound holds."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import psutil

    pytest.importorskip("sglang_router")
    from conftest import subprocess_env

    HANG = 5.0
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run),
           "trainer.warm_start_steps=0", "rollout.batch_prompts=2", "rollout.n_samples=2",
           "rollout.max_inflight_groups=6", "trainer.ppo_n_minibatches=1", "data.synthetic.num_prompts=4000",
           "trainer.steps=100000", "trainer.eval_every=0", "rollout.num_engines=2", "rollout.start_router=true",
           "rollout.max_staleness=2", f"rollout.hang_timeout_s={HANG:g}"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines: list[str] = []  # the trainer's log (fleet events are logged there)
    err_lines: list[str] = []
    def pump(f, lines):
        for line in iter(f.readline, ""):
            lines.append(line)

    readers = [threading.Thread(target=pump, args=(f, lines), daemon=True)
               for f, lines in ((proc.stdout, out_lines), (proc.stderr, err_lines))]
    for r in readers:
        r.start()

    def steps():
        f = run / "steps.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []

    def wait_for(cond, what, timeout=400):
        deadline = time.monotonic() + timeout
        while not cond():
            assert proc.poll() is None, "".join(out_lines)[-2000:] + "".join(err_lines)[-2000:]
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s\n" + "".join(out_lines)[-3000:]
            time.sleep(0.3)

    def events(url, text):
        return [x for x in out_lines if url in x and text in x]

    restarted = None
    try:
        wait_for(lambda: len(steps()) >= 2, "2 steps")
        engines = sorted((p for p in psutil.Process(proc.pid).children(recursive=True)
                          if "megatron_a3po.engine" in " ".join(p.cmdline())), key=lambda p: p.pid)
        assert len(engines) == 2
        a, b = engines
        port_of = {e: e.cmdline()[e.cmdline().index("--port") + 1] for e in engines}
        url_a, url_b = (f"http://127.0.0.1:{port_of[e]}" for e in engines)
        a_cmd, a_env = a.cmdline(), a.environ()
        headers = {"Authorization": f"Bearer {a_env['A3PO_API_KEY']}"} if a_env.get("A3PO_API_KEY") else {}

        def served_version(url):
            return httpx.get(f"{url}/model_info", headers=headers, timeout=5).json()["weight_version"]

        a.send_signal(signal.SIGKILL)
        n = len(steps())
        wait_for(lambda: len(steps()) >= n + 3, "3 steps after the kill")  # training goes on with B
        # restart A on its port with its original command, from the run's initial HF weights (version 0;
        # the trainer keeps only the newest weight dirs): synced to the trainer's version before it serves
        a_cmd[a_cmd.index("--model-path") + 1] = str(run / "init_hf")
        restarted = subprocess.Popen(a_cmd, env=a_env, stdout=open(tmp_path / "restarted.log", "w"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: events(url_a, "rejoined"), "A rejoined", timeout=300)
        # the version A serves is the trainer's (never the version-0 weights it started with)
        v_a, v_b = served_version(url_a), served_version(url_b)
        assert abs(int(v_a) - int(v_b)) <= 1 and int(v_a) >= n + 3, (v_a, v_b)  # an update may be under way

        # SIGSTOP B for 20 s (4x the hang timeout): dropped within it, training goes on with A
        n_before = len(steps())
        b.send_signal(signal.SIGSTOP)
        t_stop, t_hung = time.monotonic(), None
        try:
            while time.monotonic() - t_stop < 20:
                if t_hung is None and events(url_b, "hung"):
                    t_hung = time.monotonic() - t_stop
                time.sleep(0.2)
            during = steps()[n_before:]
        finally:
            b.send_signal(signal.SIGCONT)
        assert t_hung is not None and t_hung <= HANG + 5.0, (t_hung, "".join(out_lines)[-3000:])
        wait_for(lambda: len(events(url_b, "rejoined")) >= 1, "B rejoined after SIGCONT", timeout=300)
        assert len(during) >= 3, f"only {len(during)} steps in the 20 s B was stopped"
        # no step waited longer than the hang timeout because of B (plus a normal step's time, 5 s)
        worst = max(r["stats"]["time/step"] for r in during)
        print(f"B stopped 20 s: hung after {t_hung:.1f}s, {len(during)} steps meanwhile, the longest {worst:.2f}s")
        assert worst <= HANG + 5.0, f"a step took {worst:.1f}s while B was stopped (hang timeout {HANG}s)"
        # A (healthy) was never marked unavailable, hung or dropped after its rejoin
        i_rejoin = next(i for i, x in enumerate(out_lines) if url_a in x and "rejoined" in x)
        bad = [x for x in out_lines[i_rejoin + 1:] if url_a in x and any(
            w in x for w in (" unavailable", " hung", " dropped"))]
        assert not bad, bad
        n = len(steps())
        wait_for(lambda: len(steps()) >= n + 2, "2 steps after B rejoined")
        v_a, v_b = served_version(url_a), served_version(url_b)
        assert abs(int(v_a) - int(v_b)) <= 1  # both in the fleet, synced (one update may be in progress)

        for e in (restarted, b):
            e.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        for r in readers:
            r.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restarted is not None and restarted.poll() is None:
            restarted.kill()
            restarted.wait()
    err, out = "".join(err_lines), "".join(out_lines)
    assert proc.returncode == 1, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "trainer.resume=true" in lines[0] and lines[0].count("engine-") == 2, lines[0]
    assert err.count("every rollout engine has been unreachable") == 1 and \
        out.count("every rollout engine has been unreachable") <= 1
    recs = steps()
    gids = [g for r in recs for g in r["group_ids"]]
    assert len(gids) == len(set(gids)), "a prompt group was trained on twice"
    assert all(r["stats"]["staleness/max"] <= 2 for r in recs)


def test_real_sglang_servers_behind_the_real_router_kill_restart_stop(sglang_server, tmp_path):
    """Two real SGLang 0.5.23 servers behind sglang-router 0.3.2 (disk sync, hang timeout 3 s): SIGKILL one
    mid-run (generation goes on; it leaves the router), restart it on its port (it serves again only once
    synced: its version and its greedy log-probs equal HF's forward on the served weights), SIGSTOP the
    other past the hang timeout (dropped; updates go on with the healthy one, which is never marked
    unavailable), SIGCONT it (synced before it serves). No group lost or delivered twice, the staleness
    bound held on every delivered token. The stopped one is the session's server (put back afterwards):
    one server start fewer."""
    import signal

    pytest.importorskip("sglang_router")
    from megatron_a3po.rollout.router import router_workers, start_router
    from real_sglang import hf_model_with, reset, served_vs_hf, start_sglang

    HANG = 3.0
    logs = tmp_path / "logs"
    b, dirs = sglang_server
    reset(b.url, dirs[0])  # version 0, dirs[0]'s weights: as the server started beside it
    a = start_sglang(dirs[0], log_dir=logs)
    restarted = rp = None
    try:
        rp = start_router([a.url, b.url], log_path=logs / "router.log")
        prompts = toy_prompts(300)
        cfg = ControllerConfig(n_samples=2, max_inflight_groups=6, batch_groups=GROUPS, max_staleness=2,
                               max_new_tokens=16, seed=1)
        rm = RolloutManager([a.url, b.url], prompts, toy_task(), tokenizer(), cfg, router_url=rp.url,
                            request_timeout=60.0, health_interval_s=0.3, hang_timeout_s=HANG,
                            log_hints={e.url: e.log_path for e in (a, b)})
        delivered, served, v = [], {0: dirs[0]}, 0

        def step():
            nonlocal v
            batch = rm.get_batch(GROUPS, v, timeout=180)
            delivered.extend(batch.samples)
            assert all(v - min(s.versions) <= cfg.max_staleness for s in batch.samples)
            served[v + 1] = dirs[(v + 1) % 2]
            rm.update_weights(v + 1, hf_dir=served[v + 1])
            v += 1

        def synced(url):
            assert httpx.get(f"{url}/model_info", timeout=30).json()["weight_version"] == str(v)
            assert served_vs_hf(url, hf_model_with(served[v], hf_tensors(served[v]))) < 1e-4

        try:
            rm.start()
            step()
            threading.Timer(0.3, a.kill).start()  # SIGKILL server a (all its processes) mid-batch
            step()
            deadline = time.time() + 30
            while a.url in {w["url"] for w in router_workers(rp.url)}:
                assert time.time() < deadline, "the killed worker is still registered with the router after 30 s"
                time.sleep(0.2)
            step()
            restarted = start_sglang(dirs[0], port=a.port, log_dir=logs)  # version 0, dirs[0]'s weights
            _wait_event(rm, a.url, "rejoined", 180)
            synced(a.url)
            assert a.url in {w["url"] for w in router_workers(rp.url)}
            step()
            b.signal(signal.SIGSTOP)  # past the hang timeout: dropped; generation and updates go on with a
            try:
                step()
                _wait_event(rm, b.url, "hung", 3 * HANG + 10)
                step()
            finally:
                b.signal(signal.SIGCONT)
            _wait_event(rm, b.url, "rejoined", 180)
            synced(b.url)
            step()
            m, sd, events = rm.metrics(), rm.state_dict(), [(u, x) for _, u, x in rm.fleet.events]
        finally:
            rm.close()
    finally:
        if rp is not None:
            rp.stop()
        for e in (a, restarted):
            if e is not None:
                e.stop()
        b.signal(signal.SIGCONT)
        reset(b.url, dirs[0])
    assert m["rollout/servers_dropped"] >= 1 and m["rollout/servers_hung"] >= 1 and m["rollout/servers_rejoined"] >= 2
    after_restart = [x for u, x in events if u == a.url]
    after_restart = after_restart[after_restart.index("rejoined (synced to the current weights)") + 1:]
    assert not [x for x in after_restart if x.startswith(("unavailable", "hung", "dropped"))], events
    got = [s.group_id for s in delivered if s.sample_index == 0]
    assert len(got) == len(set(got)) == v * GROUPS  # none twice
    idx = [s.prompt_index for s in delivered if s.sample_index == 0]
    assert not set(idx) & set(sd["pending"])  # none lost: delivered once, or pending (regenerated on resume)
    order = PromptCursor(len(prompts), seed=1)._epoch_order(0)
    assert set(idx) | set(sd["pending"]) == set(order[:sd["pos"]])
