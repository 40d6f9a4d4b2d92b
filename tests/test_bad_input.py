"""Bad input, generated: trial specs, sweep files and `--set` paths that hypothesis draws
from every key the specs know (and some they do not), with values of every shape
(huge and non-finite numbers, text, nesting, lists, null). The contract for any of them:
either a valid spec, or one ConfigError whose one-line message names the key and is
short; never another exception. Through the command line: exit 0 or 2, on 2 one line on
stderr (`lth: error: KEY: VALUE is not allowed; ...`), no traceback, nothing written."""
import io
import os
import string
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator.config import apply_overrides
from orchestrator.sweep_spec import load_sweep
from trials.core.errors import LONGEST, ConfigError, shown
from trials.spec import field_paths, from_dict

BASE = {"model": {"name": "lenet_300_100"}, "dataset": {"name": "digits"},
        "train": {"iterations": 40, "eval_interval": 20, "batch_size": 60}, "prune": {"levels": 2}}
PATHS = sorted(field_paths())
SWEEP_KEYS = ["seeds", "search.algorithm", "search.num_samples", "search.metric", "search.mode", "search.seed",
              "resources.cpu", "resources.gpu", "max_concurrent", "max_failures", "tolerance", "pack", "share",
              "stop_when_not_matching", "name", "experiment", "storage", "tracking_uri", "space", "base"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=2**62, max_value=2**70), st.integers(min_value=-10, max_value=10),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-3, 0.5, 1.0, 1e300]),
    st.text(max_size=20), st.sampled_from(["auto", "cpu", "cuda", "adam", "sgd", "structured", "global", "none"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(string.ascii_lowercase, max_size=6),
                                                                       inner, max_size=3)), max_leaves=8)
paths = st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS).map(lambda p: p + ".x"),
                  st.sampled_from(["train", "prune", "model", "stability", "nonsense", "train.nonsense", "seed.x"]))


def assert_one_line(e: ConfigError) -> None:
    text = str(e)
    assert "\n" not in text and " is not allowed; " in text, text
    assert len(text) <= len(e.key) + LONGEST + 600, text  # the value is cut; what is allowed says little more


def set_text(path: str, value) -> str:
    return f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(paths, values), min_size=1, max_size=3))
def test_a_trial_spec_is_built_or_refused_in_one_line(changes):
    try:
        spec = from_dict(apply_overrides(BASE, [set_text(p, v) for p, v in changes]))
    except ConfigError as e:
        assert_one_line(e)
        assert any(e.key.split(".")[0] in (p.split(".")[0], "--set " + p.split(".")[0]) or p.startswith(e.key)
                   or e.key.startswith(p.split(".")[0]) for p, _ in changes) or e.key in PATHS, (e.key, changes)
    else:
        assert len(spec.key) == 12  # a built spec is a whole one: its content key computes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(SWEEP_KEYS), values), min_size=1, max_size=3),
       st.lists(st.tuples(paths, values), max_size=2))
def test_a_sweep_file_and_its_sets_are_loaded_or_refused_in_one_line(tmp_path, sweep_changes, base_changes):
    data = {"name": "s", "experiment": "e", "base": BASE, "storage": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    sets = [set_text(k, v) for k, v in sweep_changes] + [set_text("base." + p, v) for p, v in base_changes]
    try:
        load_sweep(path, sets, cwd=tmp_path)
    except ConfigError as e:
        assert_one_line(e)
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]  # loading writes nothing


@pytest.mark.parametrize("argv", [
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "train.lr=.inf"],
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "seed=18446744073709551616"],
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "model.width=.inf"],
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "model.width=8767066"],  # torch cannot count it
    ["sweep", "plan", "SWEEP", "--set", "space.model.width={grid: [30744573456182587]}"],
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "train.nonsense=1"],
    ["trial", "show", "--preset", "lenet_digits_quick", "--set", "stability=3"],
    ["trial", "run", "--preset", "lenet_digits_quick", "--set", "dataset={name: mnist, data_dir: /nonexistent/x}"],
    ["trial", "run", "--preset", "lenet_digits_quick", "--set", "device=cuda:7"],
    ["sweep", "plan", "SWEEP", "--set", "seeds.x=1"],
    ["sweep", "plan", "SWEEP", "--set", "seeds=100000000"],
    ["sweep", "plan", "SWEEP", "--set", "search.algorithm=random", "--set", "search.num_samples=1000000000000"],
    ["sweep", "plan", "SWEEP", "--set", "base.device=cuda"],
    ["sweep", "run", "SWEEP", "--set", "base.dataset.data_dir=/nonexistent/x"],  # `sweep plan` takes it
    ["sweep", "plan", "DUPLICATE"],
    ["sweep", "plan", "LATIN1"],
    ["sweep", "plan", "ALIASES"],
    # what `sweep run` refuses, `sweep plan` refuses too (orchestrator/sweeps/preflight.py)
    ["sweep", "plan", "SWEEP", "--set", "name=" + "n" * 300],
    ["sweep", "run", "SWEEP", "--set", "name=" + "n" * 300],
    ["sweep", "run", "SWEEP", "--name", "n" * 256],
    ["sweep", "status", "n" * 300],
    ["sweep", "plan", "SWEEP", "--set", "experiment=" + "e" * 300],
    ["sweep", "plan", "SWEEP", "--set", "storage=/tmp/" + "s" * 300],
    ["sweep", "plan", "SWEEP", "--set", "search.metric=[final_test_acc, final_test_acc]"],
    ["sweep", "plan", "SWEEP", "--set", "resources.cpu=4096"],
    ["sweep", "plan", "SWEEP", "--set", "tracking_uri=http://127.0.0.1:9"],
    ["sweep", "plan", "SWEEP", "--set", "space.model={grid: [lenet_300_100]}",
     "--set", "space.model.name={grid: [lenet_300_100, conv2]}"],
    ["sweep", "plan", "SWEEP", "--set", "space.train.lr={grid: [0.1, 0.2]}", "--set", "seeds=10000"],
    ["sweep", "plan", "SWEEP", "--set", "search.algorithm=random", "--set", "search.num_samples=10000",
     "--set", "seeds=2"],
    # no data_dir and no network (a proxy nobody answers at): the download fails, its folder goes
    ["trial", "run", "--preset", "lenet_digits_quick", "--set", "dataset=mnist"],
    ["report", "table", "--experiment", "nope", "--rows", "prune.kind"],
    ["tickets", "best", "--experiment", "nope"],
    ["tickets", "best", "--experiment", "nope", "--top", "0"],
])
def test_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, argv):
    from lth.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    offline(monkeypatch, tmp_path / "cache" / "lth")
    files = {
        "SWEEP": "name: s\nexperiment: e\nbase: {model: lenet_300_100, dataset: digits}\n",
        "DUPLICATE": "name: s\nexperiment: e\nbase: {model: lenet_300_100, dataset: digits, train: {lr: -5, lr: 0.001}}\n",
        "LATIN1": "name: s\xe9\nexperiment: e\n".encode("latin-1"),
        "ALIASES": "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                   "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
                   "f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\nname: s\nexperiment: e\nbase: {model: lenet_300_100}\n",
    }
    for i, arg in enumerate(argv):
        if arg in files:
            target = tmp_path / f"{arg.lower()}.yaml"
            (target.write_bytes if isinstance(files[arg], bytes) else target.write_text)(files[arg])
            argv = [*argv[:i], str(target), *argv[i + 1:]]
    before = sorted(os.listdir(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lth: error: ") and " is not allowed; " in lines[0], \
        (code, err.getvalue())
    assert len(lines[0]) < 400, lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no folder, no mlflow.db
    assert not Path("runs").exists()


def offline(monkeypatch, cache: Path) -> None:
    """No network for downloads (every http(s) request goes to a proxy that is not there)
    and the dataset cache at `cache`."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LTH_DATA_DIR", str(cache))
    # urlopen builds its opener once, from the proxies set at its first call, and keeps it:
    # put back the one before this test, so no later test in the process reaches a local
    # server through the dead proxy
    monkeypatch.setattr(urllib.request, "_opener", None)


SPACE_PATHS = ["model", "model.name", "model.width", "dataset", "dataset.name", "train.lr", "prune.rate", "prune.kind"]
space_entries = st.dictionaries(st.sampled_from(SPACE_PATHS),
                                st.builds(lambda v: {"grid": v}, st.lists(scalars, min_size=1, max_size=2)),
                                max_size=3)
names = st.one_of(st.sampled_from(["s", "a.b-c_d"]), st.text(string.ascii_letters, min_size=190, max_size=300))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(names, names, space_entries, st.sampled_from([["final_test_acc"], ["final_test_acc", "final_test_acc"],
                                                     ["final_test_acc", "max_test_acc"]]))
@example("s", "s", {"model": {"grid": ["\x1e"]}}, ["final_test_acc"])  # a control character in a combination
def test_what_sweep_plan_accepts_the_sweep_can_start_with(tmp_path, monkeypatch, name, experiment, space, metric):
    """`lth sweep plan` answers (exit 0) or refuses in one line (exit 2), writing nothing;
    when it answers, the first things `lth sweep run` writes can be written: the sweep's
    folder and file, its study file's name and the experiment's artifact folder."""
    from lth.cli import main
    from orchestrator.sweeps.storage import SWEEP_FILE

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tmp_path / f"case{len(os.listdir(tmp_path))}"
    folder.mkdir()
    data = {"name": name, "experiment": experiment, "base": BASE, "space": space, "search": {"metric": metric},
            "storage": str(folder / "runs"), "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"}
    (folder / "s.yaml").write_text(yaml.safe_dump(data))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["sweep", "plan", str(folder / "s.yaml")])
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 2) and len(lines) == (code == 2), (code, err.getvalue()[-2000:])
    assert not code or lines[0].startswith("lth: error: ")
    assert sorted(os.listdir(folder)) == ["s.yaml"]
    if code == 0:  # what `sweep run` would make first (runner.save_sweep, _study_file; store.experiment_id)
        (folder / "runs" / name).mkdir(parents=True)
        (folder / "runs" / name / SWEEP_FILE).write_text("")
        (folder / "runs" / name / f"{name}-0123abcd.db").write_text("")
        (folder / "mlartifacts" / experiment).mkdir(parents=True)


def test_sweep_plan_takes_a_data_dir_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """Planning trains nothing: a data folder that exists only on the cluster is no error
    here (`sweep run` still refuses it, above)."""
    from lth.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("name: s\nexperiment: e\nbase: {model: lenet_300_100, dataset: {name: mnist, "
                                     "data_dir: /nonexistent/x}}\n")
    assert main(["sweep", "plan", "s.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith("plan: 1 trial, 6 levels, ")
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]


def test_a_config_error_crosses_process_boundaries_intact():
    """A worker's refusal reaches the sweep driver as itself (Ray pickles exceptions)."""
    import pickle

    e = ConfigError("train.lr", float("inf"), "expected a finite number")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is ConfigError and str(back) == str(e) and back.key == "train.lr"
    assert back.allowed == "expected a finite number"


def test_a_sweep_whose_storage_is_a_file_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    from lth.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "s", "experiment": "e", "base": {"model": "lenet_300_100", "dataset": "digits"},
        "storage": str(tmp_path / "afile" / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["sweep", "run", str(tmp_path / "s.yaml")]) == 2
    # the value as every refusal shows it (`shown`: cut where long, as a worker's temp path may be)
    assert err.getvalue().strip() == (f"lth: error: storage: {shown(str(tmp_path / 'afile' / 'runs'))} is not allowed; "
                                      f"a folder ({tmp_path / 'afile'} is a file)")
    assert sorted(os.listdir(tmp_path)) == ["afile", "s.yaml"]  # no MLflow store, no Ray session folder here
