"""The analysis notebooks, executed top to bottom against a real sweep's MLflow store."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from orchestrator.sweeps import runner
from orchestrator.tracking import experiment_tickets
from orchestrator.sweep_spec import load_sweep
from tests.conftest import digits_base

NOTEBOOKS = Path(__file__).resolve().parent.parent / "analysis" / "notebooks"
EXPERIMENT = "nb-exp"
BASE = digits_base(levels=2)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, ray_local):
    """4 real IMP trials (unstructured/structured x 2 seeds, 2 levels) tracked in SQLite."""
    tmp = tmp_path_factory.mktemp("notebooks")
    data = {"name": "nb-sweep", "experiment": EXPERIMENT, "base": BASE,
            "space": {"prune.kind": {"grid": ["unstructured", "structured"]}}, "seeds": 2,
            "resources": {"cpu": 1}, "max_concurrent": 2, "storage": str(tmp / "runs"),
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    path = tmp / "nb-sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    runner.run(load_sweep(path))
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


def _is_this_python(argv0: str) -> bool:
    # jupyter_client replaces a bare "python"/"python3" with sys.executable when it launches
    return argv0 in ("python", "python3", f"python{sys.version_info[0]}") or \
        Path(argv0).resolve() == Path(sys.executable).resolve()


def kernel_name(tmp: Path, monkeypatch) -> str:
    """"python3" when it starts this interpreter (the venv's ipykernel); else a kernelspec,
    written under tmp only, that does."""
    try:
        if _is_this_python(KernelSpecManager().get_kernel_spec("python3").argv[0]):
            return "python3"
    except NoSuchKernel:
        pass
    spec_dir = tmp / "jupyter" / "kernels" / "lth-test"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lth test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    return "lth-test"


def execute(name: str, tmp: Path, uri: str, monkeypatch, **env) -> nbformat.NotebookNode:
    for key, value in {"LTH_EXPERIMENT": EXPERIMENT, "MLFLOW_TRACKING_URI": uri, **env}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name=kernel_name(tmp, monkeypatch),
                            resources={"metadata": {"path": str(tmp)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    return nb


def text_of(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out:
                parts.extend(str(out["data"].get(kind, "")) for kind in ("text/plain", "text/markdown"))
            assert out.get("output_type") != "error", out
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["ablation_tables.ipynb", "best_tickets.ipynb"])
def test_stored_notebooks_have_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_kernel_runs_this_interpreter(experiment, monkeypatch):
    tmp, _ = experiment
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import sys, analysis; print(sys.executable); print(analysis.__file__)")])
    NotebookClient(nb, timeout=120, kernel_name=kernel_name(tmp, monkeypatch)).execute()
    stdout = "".join(o["text"] for o in nb.cells[0].outputs if o.get("name") == "stdout")
    executable, module = stdout.split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(module).resolve() == (NOTEBOOKS.parent / "__init__.py").resolve()


def test_ablation_notebook_writes_tables_and_plot(experiment, monkeypatch):
    tmp, uri = experiment
    reports = tmp / "reports"
    nb = execute("ablation_tables.ipynb", tmp, uri, monkeypatch, LTH_REPORT_DIR=str(reports))
    text = text_of(nb)
    tex = (reports / "ablation.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert "unstructured" in tex and "structured" in tex
    md = (reports / "ablation.md").read_text()
    assert "| dense |" in md and "(n=2)" in md
    csv = (reports / "ablation.csv").read_text().splitlines()
    assert csv[0].startswith("prune.kind,rewind_iteration,column,level")
    assert len(csv) == 1 + 2 * 3  # 2 kinds x levels 0..2
    png = reports / "imp_curves.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{EXPERIMENT}: 4 trials, 12 trial x level rows" in text
    assert "matches the dense network" in text  # the rule is printed under the table
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_ablation_notebook_reads_rows_and_densities_from_the_environment(experiment, monkeypatch):
    tmp, uri = experiment
    reports = tmp / "reports-densities"
    execute("ablation_tables.ipynb", tmp, uri, monkeypatch, LTH_REPORT_DIR=str(reports), LTH_ROWS="prune.kind",
            LTH_DENSITIES="1, 0.7,0.5")
    csv = (reports / "ablation.csv").read_text().splitlines()
    assert csv[0].startswith("prune.kind,column,level") and len(csv) == 1 + 2 * 3
    assert {line.split(",")[1] for line in csv[1:]} == {"1", "0.7", "0.5"}
    assert r"$\approx$50\%" in (reports / "ablation.tex").read_text()
    assert (reports / "imp_curves.png").stat().st_size > 0


def test_best_tickets_notebook_exports_and_checks_the_best_sparse_ticket(experiment, monkeypatch):
    tmp, uri = experiment
    nb = execute("best_tickets.ipynb", tmp, uri, monkeypatch, LTH_MAX_DENSITY="0.5")
    text = text_of(nb)
    expected = experiment_tickets.best(EXPERIMENT, uri, max_density=0.5, top=1)
    assert expected, "the sweep has no level at density <= 0.5"
    record = [line for line in text.splitlines() if line.startswith("record: ")]
    assert len(record) == 1
    shown = json.loads(record[0][len("record: "):])
    assert shown["run_id"] == expected[0]["run_id"] and shown["level"] == expected[0]["level"]
    assert shown["density"] == pytest.approx(expected[0]["density"]) and shown["density"] <= 0.5
    assert shown["test_acc"] == pytest.approx(expected[0]["test_acc"])
    assert "pruned entries that are zero" in text
    zero, pruned = text.split("pruned entries that are zero: ")[1].split("\n")[0].split(" of ")
    assert int(zero) == int(pruned) > 0
