"""The schedule of an asynchronous run: what a replay needs to reproduce it whatever the timing
(docs/algorithm.md, "Record and replay").

``schedule.jsonl`` (``replay.record``): a header line, then one line per training step::

    {"schema": "a3po.schedule/1", "sampling_seed": 1234, "n_samples": 8, "max_new_tokens": 2,
     "batch_prompts": 32, "max_staleness": 2}
    {"step": 1, "version": 0, "groups": [{"gid": 0, "prompt_index": 17, "samples": [
        {"segments": [[0, [[0, 1]]], [1, [[1, 1]]]], "finish": "stop"}, ...]}, ...]}

Per trained group (in the order the step trained them) and sample (in order), the segments that produced
its response: ``[segment index, [[version, tokens], ...]]``, the versions as spans over the segment's
tokens. A segment is one /generate request: the group's request (index 0, all ``n`` samples at once) or a
resumed sample (after a weight update aborted it; the index is also the one its sampling seed derives
from, see workflow.GroupWorkflow.request_seed). Every segment but the last was interrupted after its
tokens; the last one ended with ``finish``. Segments whose tokens were thrown away (a sample restarted as
too stale) are not in it, nor are groups that were never trained.

With the seed, the schedule fixes every draw: the group ids and prompts of each step, the version of every
generated token, and where each sample was cut. :func:`compare_step_records` says whether two runs' step
records are bit-identical, apart from what measures time or the rollout's progress.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from megatron_a3po.errors import A3POError

SCHEMA = "a3po.schedule/1"
HEADER_KEYS = ("sampling_seed", "n_samples", "max_new_tokens", "batch_prompts", "max_staleness")

__all__ = ["SCHEMA", "ScheduleError", "Schedule", "ScheduleRecorder", "SamplePlan", "GroupPlan",
           "compare_step_records", "TIMING_PREFIXES"]


class ScheduleError(A3POError, ValueError):
    pass


def _spans(versions: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for v in versions:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([int(v), 1])
    return out


def sample_entry(s) -> dict:
    """One trained sample (rollout/types.Sample) as its schedule entry."""
    segs, k = [], 0
    if sum(n for _, n in s.segments) != len(s.versions):
        raise ScheduleError(f"sample {s.sample_index} of group {s.group_id}: segments {s.segments} do not cover "
                            f"its {len(s.versions)} tokens")
    for idx, n in s.segments:
        segs.append([int(idx), _spans(s.versions[k:k + n])])
        k += n
    return {"segments": segs, "finish": s.finish_reason}


class ScheduleRecorder:
    """Appends the schedule of a run as it trains (rank 0's rollout side calls ``record`` per batch)."""

    def __init__(self, path, header: dict, *, start_step: int = 0):
        self.path = Path(path)
        self.step = start_step
        if start_step == 0 or not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"schema": SCHEMA, **header}) + "\n")
            os.replace(tmp, self.path)
        else:  # a resumed run: keep the steps up to the checkpoint, drop later ones (like steps.jsonl)
            lines = self.path.read_text().splitlines()
            keep = lines[:1] + [ln for ln in lines[1:] if _step_of(ln) is not None and _step_of(ln) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, self.path)

    def record(self, version: int, groups) -> None:
        self.step += 1
        rec = {"step": self.step, "version": int(version),
               "groups": [{"gid": g[0].group_id, "prompt_index": g[0].prompt_index,
                           "samples": [sample_entry(s) for s in g]} for g in groups]}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class SamplePlan:
    segments: list[tuple[int, list[tuple[int, int]]]]  # (segment index, [(version, tokens), ...])
    finish: str

    def tokens(self, k: int) -> int:
        return sum(n for _, n in self.segments[k][1])


@dataclass
class GroupPlan:
    gid: int
    prompt_index: int
    step: int
    samples: list[SamplePlan] = field(default_factory=list)

    def first_version(self) -> int:
        """The newest version the group's first request (segment 0 of its samples) needs."""
        vs = [v for s in self.samples if s.segments and s.segments[0][0] == 0 for v, n in s.segments[0][1] if n]
        return max(vs, default=-1)


@dataclass
class Schedule:
    header: dict
    steps: list[tuple[int, list[GroupPlan]]]  # (version trained, groups in training order) per step
    path: str = ""

    @property
    def groups(self) -> dict[int, GroupPlan]:
        return {g.gid: g for _, gs in self.steps for g in gs}

    @classmethod
    def load(cls, path) -> "Schedule":
        """Read and check a schedule.jsonl; errors name the file, the line and the field."""
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise ScheduleError(f"replay.schedule={path}: cannot read: {e}") from None
        if not lines:
            raise ScheduleError(f"{path}: empty (no header line)")
        try:
            header = json.loads(lines[0])
        except ValueError as e:
            raise ScheduleError(f"{path}:1: not JSON: {e}") from None
        if not isinstance(header, dict) or header.get("schema") != SCHEMA:
            raise ScheduleError(f"{path}:1: not a schedule header (schema {SCHEMA!r})")
        missing = [k for k in HEADER_KEYS if k not in header]
        if missing:
            raise ScheduleError(f"{path}:1: header lacks {missing}")
        steps, seen = [], set()
        for n, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
                if rec["step"] != len(steps) + 1:
                    raise ScheduleError(f"{path}:{n}: step {rec['step']}, expected {len(steps) + 1}")
                V = int(rec["version"])
                gs = []
                for g in rec["groups"]:
                    gp = GroupPlan(int(g["gid"]), int(g["prompt_index"]), rec["step"])
                    if gp.gid in seen:
                        raise ScheduleError(f"{path}:{n}: group {gp.gid} trained twice")
                    seen.add(gp.gid)
                    for s in g["samples"]:
                        segs = [(int(i), [(int(v), int(c)) for v, c in spans]) for i, spans in s["segments"]]
                        if any(not V - header["max_staleness"] <= v <= V for _, sp in segs for v, c in sp if c):
                            raise ScheduleError(f"{path}:{n}: group {gp.gid} has a token outside versions "
                                                f"[{V - header['max_staleness']}, {V}]")
                        gp.samples.append(SamplePlan(segs, str(s["finish"])))
                    if len(gp.samples) != header["n_samples"]:
                        raise ScheduleError(f"{path}:{n}: group {gp.gid} has {len(gp.samples)} samples, "
                                            f"header n_samples={header['n_samples']}")
                    gs.append(gp)
            except ScheduleError:
                raise
            except (ValueError, KeyError, TypeError) as e:
                raise ScheduleError(f"{path}:{n}: not a schedule step: {type(e).__name__}: {e}") from None
            steps.append((V, gs))
        return cls(header, steps, str(path))


# step-record stats that measure time, throughput or the rollout's progress (when what was generated and
# when), not what was trained: left out of a bit-identity check
TIMING_PREFIXES = ("time/", "throughput/", "rollout/")


def _view(rec: dict) -> dict:
    st = {k: v for k, v in rec.get("stats", {}).items() if not k.startswith(TIMING_PREFIXES)}
    out = {k: v for k, v in rec.items() if k not in ("stats", "eval")}
    out["stats"] = st
    if "eval" in rec:  # evaluation results, without their timing and file paths
        out["eval"] = [{k: v for k, v in e.items() if k not in ("seconds", "generations")} for e in rec["eval"]]
    return out


def compare_step_records(a_path, b_path, *, steps: int | None = None) -> tuple[int, list[str]]:
    """Compare two runs' steps.jsonl (the first ``steps`` steps): (steps compared, differences). Every
    field of every record must be equal bit for bit (floats as the JSON holds them), except the stats
    under TIMING_PREFIXES and the evaluations' seconds and file paths."""
    def load(p):
        return [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]

    a, b = load(a_path), load(b_path)
    n = min(len(a), len(b)) if steps is None else steps
    diffs = []
    if len(a) < n or len(b) < n:
        diffs.append(f"records: {len(a)} vs {len(b)}, {n} to compare")
        n = min(len(a), len(b), n)
    for ra, rb in zip(a[:n], b[:n]):
        va, vb = _view(ra), _view(rb)
        if va == vb:
            continue
        keys = sorted(set(va["stats"]) | set(vb["stats"]))
        bad = [k for k in keys if va["stats"].get(k) != vb["stats"].get(k)]
        other = [k for k in set(va) | set(vb) if k != "stats" and va.get(k) != vb.get(k)]
        diffs.append(f"step {ra.get('step')}: {', '.join(sorted(other) + bad[:6])}"
                     + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    return n, diffs
