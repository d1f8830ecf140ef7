"""Imports point down: config/io/metrics < platform < ops < models < loss, convert < rollout, engine < trainer
< launch, tools, bench. A module may import its own package and any lower layer; a library package never
imports a peer of its own layer (loss vs convert, rollout vs engine) or anything above it. Read with ``ast``
from the source files, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "megatron_a3po.errors": -1,  # the one base of our errors: below everything, imports nothing of ours
    "megatron_a3po.config": 0, "megatron_a3po.io": 0, "megatron_a3po.metrics": 0,
    "megatron_a3po.platform": 1,
    "megatron_a3po.ops": 2,
    "megatron_a3po.models": 3,
    "megatron_a3po.loss": 4, "megatron_a3po.convert": 4,
    "megatron_a3po.rollout": 5, "megatron_a3po.engine": 5,
    "megatron_a3po.trainer": 6,
    # the top: entry points that may use each other (bench measures tools' CLIs)
    "launch": 7, "tools": 7, "bench": 7,
    "recipes": 8,  # YAML files: no code may import the folder
}
TOP = 7


def _unit(module: str) -> str | None:
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    return None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for a in node.names:  # ``from megatron_a3po import engine`` names a package too
                yield node.lineno, f"{node.module}.{a.name}"


def violations(root: Path = ROOT) -> list[str]:
    out = []
    files = [p for d in ("megatron_a3po", "launch", "tools", "bench", "recipes") for p in (root / d).rglob("*.py")]
    for p in sorted(files):
        me = _unit(".".join(p.relative_to(root).with_suffix("").parts))
        if me is None:
            continue
        for line, name in _imports(p):
            other = _unit(name)
            if other is None or other == me:
                continue
            if LAYERS[other] > LAYERS[me] or (LAYERS[other] == LAYERS[me] and LAYERS[me] < TOP) \
                    or other == "recipes":
                out.append(f"{p.relative_to(root)}:{line} ({me}, layer {LAYERS[me]}) imports {other} "
                           f"(layer {LAYERS[other]})")
    return sorted(set(out))


def test_every_package_is_placed():
    pkgs = {f"megatron_a3po.{p.name}" for p in (ROOT / "megatron_a3po").iterdir()
            if (p / "__init__.py").exists() or p.suffix == ".py" and p.stem != "__init__"}
    pkgs = {p.removesuffix(".py") for p in pkgs}
    assert pkgs <= set(LAYERS), f"new package(s) without a layer in tests/test_layering.py: {sorted(pkgs - set(LAYERS))}"


def test_imports_point_down():
    bad = violations()
    assert not bad, "imports that point up or across a layer:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself, on a tree made here: an ops module importing the trainer is reported."""
    (tmp_path / "megatron_a3po" / "ops").mkdir(parents=True)
    (tmp_path / "megatron_a3po" / "ops" / "x.py").write_text("def f():\n    from megatron_a3po.trainer import loop\n")
    (tmp_path / "megatron_a3po" / "engine").mkdir()
    (tmp_path / "megatron_a3po" / "engine" / "y.py").write_text("import megatron_a3po.rollout.weights\n")
    got = violations(tmp_path)
    assert len(got) == 2, got
    assert "engine/y.py:1" in got[0] and "imports megatron_a3po.rollout " in got[0]
    assert "ops/x.py:2" in got[1] and "imports megatron_a3po.trainer " in got[1]


MAX_BODY_LINES = 80  # a function longer than this does more than one thing (issue 28)


def long_functions(root: Path = ROOT) -> list[str]:
    """Functions of the library, launch/ and tools/ whose body (docstring not counted) is over the limit."""
    out = []
    for top in ("megatron_a3po", "launch", "tools"):
        for path in sorted((root / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
                    body = body[1:]
                n = body[-1].end_lineno - body[0].lineno + 1
                if n > MAX_BODY_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_function_body_over_80_lines():
    assert long_functions() == []


def test_the_length_check_counts_the_body_not_the_docstring(tmp_path):
    (tmp_path / "megatron_a3po").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES))
    doc = '    """' + "\n" * 30 + '    """\n'
    (tmp_path / "megatron_a3po" / "m.py").write_text(f"def ok():\n{doc}{body}\n\n\ndef long():\n{body}\n    y = 1\n")
    (tmp_path / "launch").mkdir()
    (tmp_path / "tools").mkdir()
    assert long_functions(tmp_path) == [f"megatron_a3po/m.py:{MAX_BODY_LINES + 35} long: {MAX_BODY_LINES + 1} lines"]


BUILTIN_ERRORS = {"Exception", "ValueError", "RuntimeError", "OSError", "TypeError", "KeyError"}
# raised and caught inside one module, never reaching a caller: a request's loss (rollout/fleet.py), the
# HTTP replies of the engine (engine/validate.py: its exception handler answers them), and the simulated
# cluster's stand-in for torch's own NCCL error
NOT_OURS_TO_REPORT = {"_Lost", "ApiError", "SimNCCLError"}


def errors_without_the_base(root: Path = ROOT) -> list[str]:
    """Exception classes of the library, launch/ and tools/ that derive from a builtin exception but not
    from megatron_a3po.errors (directly or through another class of ours)."""
    out = []
    for top in ("megatron_a3po", "launch", "tools"):
        for path in sorted((root / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and node.name not in NOT_OURS_TO_REPORT | {"A3POError"}:
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                    if bases & BUILTIN_ERRORS and not bases & {"A3POError", "RunFailure"}:
                        out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return out


def test_every_error_of_ours_has_the_one_base():
    """Entry points catch megatron_a3po.errors.A3POError alone (issue 28: ~20 classes, no common base)."""
    assert errors_without_the_base() == []
