"""The layers of ARCHITECTURE.md, checked on the source: no import cycle between modules,
packages import only downward (trials <- orchestrator <- analysis <- lth), the wings of
trials/ too (core <- folder <- nets <- loop <- methods <- spec <- runner <- export), and each
third-party library has one home."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trials", "orchestrator", "analysis", "lth")  # bottom to top
WINGS = ("core", "folder", "nets", "loop", "methods", "spec", "runner", "export")  # trials/'s, bottom to top
HOMES = {  # library -> the only modules (prefixes) that may import it
    "ray": ("orchestrator.sweeps.",),
    "optuna": ("orchestrator.sweeps.search",),
    "mlflow": ("orchestrator.tracking.store",),
}


def modules() -> dict:
    """module name -> source path, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set:
    """Everything `name` imports anywhere in its file (function-level imports included);
    `from pkg import sub` counts as importing the module pkg.sub when there is one."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def graph() -> dict:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def cycle(edges: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_packages_import_only_downward():
    for name, targets in graph().items():
        level = PACKAGES.index(name.split(".")[0])
        for target in targets:
            assert PACKAGES.index(target.split(".")[0]) <= level, f"{name} imports {target} (upward)"


def wing(module: str) -> int:
    """A trials module's floor: its wing's place in WINGS; `trials` itself (the front door) is above them all."""
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 else len(WINGS)


def test_every_trials_module_is_in_a_wing():
    strays = [m for m in modules() if m.startswith("trials.") and m.split(".")[1] not in WINGS]
    assert not strays, f"trials modules outside the wings {WINGS}: {strays}"


def test_wings_import_only_their_own_or_lower_ones():
    for name, targets in graph().items():
        if not name.startswith("trials."):
            continue
        for target in targets:
            if target.split(".")[0] == "trials":
                assert wing(target) <= wing(name), f"{name} imports {target} (a higher wing)"


def test_no_trials_module_is_over_400_lines():
    """A module a reader takes in at once: one concern per file (ARCHITECTURE.md, "Layers")."""
    long = {m: n for m, path in modules().items() if m.startswith("trials")
            and (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"over 400 lines: {long}"


def test_the_wing_check_sees_a_wing_importing_upward():
    assert wing("trials.loop.training") < wing("trials.runner.levels") < wing("trials")
    assert wing("trials.core.errors") == wing("trials.core") == 0


@pytest.mark.parametrize("library", sorted(HOMES))
def test_each_library_has_one_home(library):
    known = modules()
    users = {name for name, path in known.items()
             if any(m == library or m.startswith(library + ".") for m in imports(name, path, known))}
    assert users, f"nothing imports {library}"
    strays = {u for u in users if not u.startswith(HOMES[library])}
    assert not strays, f"{library} imported outside {HOMES[library]}: {sorted(strays)}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


OUTSIDE = re.compile("DESIGN" + r"\.md|house " + "rule", re.IGNORECASE)  # split: this file must not match


def test_comments_cite_the_repository_not_documents_outside_it():
    """Code points readers at ARCHITECTURE.md sections that exist, never at the founding brief."""
    headings = {line.lstrip("#").strip() for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines()
                if line.startswith("#")}
    sources = [*modules().values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]
    cited = set()
    for path in sources:
        text = path.read_text()
        assert not OUTSIDE.search(text), f"{path} cites a document outside the repository"
        cited.update(" ".join(c.split()) for c in re.findall(r'ARCHITECTURE\.md,\s+"([^"]+)"', text))
    assert cited, "no code cites ARCHITECTURE.md"
    missing = {c for c in cited if not any(h.startswith(c) for h in headings)}
    assert not missing, f"cited sections not in ARCHITECTURE.md: {sorted(missing)}"


# What a spec and a plan may load (trials/__init__.py): not the loop, the runner, export, the
# Tune side of the orchestrator, or a method's implementation (the registry, and the
# candidates and counts of trials/methods/counting.py, are what validation asks).
ENGINE = ("trials.loop", "trials.runner", "trials.export", "orchestrator.sweeps.trainable", "orchestrator.sweeps.runner",
          "ray", "mlflow")
LIGHT_METHODS = ("trials.methods", "trials.methods.counting")


def loaded_after(code: str) -> list:
    """The engine modules (ENGINE, and methods/ modules but LIGHT_METHODS) that `code` imports,
    run in a fresh interpreter."""
    import subprocess
    import sys

    probe = code + (
        "\nimport sys, json\n"
        f"ENGINE, LIGHT = {ENGINE!r}, {LIGHT_METHODS!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == e or m.startswith(e + '.') for e in ENGINE)"
        " or (m.startswith('trials.methods.') and m not in LIGHT))))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout.splitlines()[-1])


def test_building_and_validating_specs_imports_no_engine():
    """Every registered method's spec, built and validated, and its packing and sharing asked."""
    code = """
from trials import methods
from trials.spec import from_dict, packing, sharing
for name in methods.names():
    spec = from_dict({"method": name, "dataset": {"name": "digits"},
                      "train": {"iterations": 400, "eval_interval": 200, "batch_size": 60},
                      "prune": {"levels": 2}, "rewind_iteration": 10,
                      **({"supermask": {"densities": [0.5, 0.3]}} if methods.get(name).trains == "scores" else {})})
    packing.pack_key(spec), packing.why_not_packed(spec), sharing.plan(spec) if sharing.shareable(spec) else None
"""
    assert loaded_after(code) == []


def test_planning_a_sweep_of_packs_imports_no_engine(tmp_path):
    """`lth sweep plan`'s work: the sweep read, its trials planned into packs and units."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nexperiment: s\nbase: {preset: lenet_digits_quick, train: {iterations: 60, "
                     "eval_interval: 30}, prune: {levels: 2}}\nspace: {prune.rate: {grid: [0.2, 0.4]}, "
                     "method: {grid: [imp, snip]}}\nseeds: 2\npack: 4\n")
    code = f"""
from orchestrator import plan
from orchestrator.sweep_spec import load_sweep
sweep = load_sweep({str(sweep)!r}, here=False)
plan.describe(sweep, plan.plan(sweep)), plan.packs(sweep, plan.trial_configs(sweep)[0])
"""
    assert loaded_after(code) == []


def test_the_engine_probe_sees_the_loop():
    assert "trials.loop.training" in loaded_after("import trials.runner.levels")


def test_the_trial_worker_imports_no_planner():
    """A Tune trial's worker decides nothing (orchestrator/sweeps/trainable.py): what it
    runs comes in its config, so nothing it imports, at any depth or inside a function,
    reaches the planner."""
    edges, seen, todo = graph(), set(), ["orchestrator.sweeps.trainable"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges[name])
    assert "orchestrator.plan" not in seen, "the trainable reaches orchestrator.plan"
    assert "orchestrator.sweeps.packs" in seen  # the check follows imports (the config's layout)
