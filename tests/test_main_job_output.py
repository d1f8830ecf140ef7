"""The main job (demo recipe, 3 steps) with its output to a pipe: every line is a whole log line (the
end-of-run table aside), Megatron's known warnings take one line, and the held-out evaluation it logs
is recomputed from the saved generations with the task's rule written out here. It logs to wandb in
offline mode too: the keys wandb recorded per step (read from wandb's own run file) are steps.jsonl's."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
PROGRESS_LINE = re.compile(r"^A-3PO:\s+\d+%\|")

pytestmark = pytest.mark.slow


def test_demo_piped_output_eval_and_cursor(tmp_path):
    run_dir = tmp_path / "run"
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("A3PO_NO_PROGRESS", None)  # the job itself must see it is not on a terminal
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           "trainer.steps=3", "trainer.warm_start_steps=2", "rollout.batch_prompts=4", "rollout.n_samples=4",
           "rollout.max_inflight_groups=12", "trainer.ppo_n_minibatches=2", "data.synthetic.num_prompts=400",
           "trainer.eval_every=2", "logging.wandb.mode=offline"]
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing of wandb's outside the test
        env[k] = str(tmp_path / "wandb_home")
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=420)
    out = p.stdout
    assert p.returncode == 0, out[-4000:]
    lines = out.splitlines()
    table = next(i for i, l in enumerate(lines) if "A-3PO run (" in l)  # the end-of-run table
    body = lines[:table]
    bad = [l for l in body if not (LOG_LINE.match(l) or PROGRESS_LINE.match(l))]
    assert not bad, f"lines that are neither log nor progress lines: {bad[:5]}"
    assert not any("\r" in l for l in lines), "a progress bar wrote to the pipe"
    assert sum("megatron" in l.lower() and ("warn" in l.lower() or "fallback" in l.lower()) for l in lines) <= 3
    assert sum("megatron-core fallbacks" in l for l in body) == 1
    assert any("eval accuracy, best" in l for l in lines[table:])

    records = [json.loads(l) for l in (run_dir / "steps.jsonl").read_text().splitlines()]
    evals = [e for r in records for e in r.get("eval", [])]
    assert [e["version"] for e in evals] == [0, 2, 3]  # step 0, every 2 steps, the last step
    held = [json.loads(l) for l in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    train_q = {json.loads(l)["question"] for l in (run_dir / "data" / "train.jsonl").read_text().splitlines()}
    assert len(held) == 20 and not train_q & {h["question"] for h in held}  # never trained on
    for e in evals:
        gens = [json.loads(l) for l in Path(e["generations"]).read_text().splitlines()]
        assert len(gens) == 20 and all(set(g["versions"]) == {e["version"]} for g in gens)
        # the demo task's rule: the answer is the largest digit of the question, alone
        correct = [g["text"].strip() == max(g["record"]["question"]) for g in gens]
        assert e["eval/accuracy"] == pytest.approx(sum(correct) / len(gens))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["last"] == pytest.approx(evals[-1]["eval/accuracy"])
    assert summary["eval"]["best"] == pytest.approx(max(e["eval/accuracy"] for e in evals))

    # the training cursor is untouched by evaluation: with no stale drop possible in 3 steps at
    # max_staleness 2, the batches are the first prompts of the seeded epoch order, in order
    order = list(range(400))
    random.Random(1234 * 100003).shuffle(order)
    assert [i for r in records for i in r["prompt_indices"]] == order[:12]
    assert all(r["stats"].get("rollout/groups_dropped_stale", 0) == 0 for r in records)

    # wandb logged, per step, the keys of the step's steps.jsonl stats and of the evaluations that finished
    # in it (eval/version says which one: the newest); its own keys start with "_"
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = {row["_step"]: row for row in wandb_history(run_file)}
    assert sorted(rows) == [r["step"] for r in records]
    for r in records:
        expected = set(r["stats"]) | {k for e in r.get("eval", []) for k in e if k.startswith("eval/")}
        expected |= {"eval/version"} if r.get("eval") else set()
        assert {k for k in rows[r["step"]] if not k.startswith("_")} == expected, r["step"]
        assert rows[r["step"]]["reward/mean"] == pytest.approx(r["stats"]["reward/mean"])


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a wandb run file (``run-<id>.wandb``: wandb's records, protobuf ``Record``s of
    wandb's own schema, framed as a LevelDB log: a 7-byte file header, then 32 KiB blocks of chunks, each
    with a 7-byte header: crc32c, length (2 bytes, little-endian), type 1 full / 2 first / 3 middle /
    4 last). wandb 0.31 ships no Python reader of these files (its ``wandb sync`` is in Go)."""
    from wandb.proto.wandb_internal_pb2 import Record

    buf = path.read_bytes()
    assert buf[:4] == b":W&B", path
    block, pos, data, rows = 32768, 7, b"", []
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(buf[pos + 4:pos + 6], "little"), buf[pos + 6]
        data += buf[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = Record()
            rec.ParseFromString(data)
            data = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_summary_table_skips_sibling_summaries_that_are_not_runs_of_ours(tmp_path, capsys):
    """A run dir's parent (often /tmp) may hold other programs' summary.json: they are skipped, and a
    sibling run of the same recipe in another mode gets its column."""
    import json

    from megatron_a3po.trainer.__main__ import SUMMARY_KEYS, print_summary

    ours = {k: 1.0 for k in SUMMARY_KEYS} | {"mode": "loglinear", "recipe": "demo_cpu", "window": 20, "steps": 3,
                                            "tensorboard": str(tmp_path / "this" / "tb")}
    for name, body in (("stranger", {"recipe": "demo_cpu", "status": "ok"}), ("list", [1, 2]),
                       ("recompute", ours | {"mode": "recompute"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(body))
    print_summary(ours, str(tmp_path / "this"))
    out = capsys.readouterr().out
    assert "recompute" in out and "loglinear (this run)" in out
