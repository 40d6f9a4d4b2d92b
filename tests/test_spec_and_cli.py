"""TrialSpec validation and keys; `lth trial` on good and bad configs."""
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from lth.cli import main
from orchestrator.config import preset_names, trial_spec
from trials.spec import PruneSpec, TrialSpec, from_dict

QUICK = {
    "model": "lenet_300_100",
    "dataset": {"name": "digits"},
    "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 60, "eval_interval": 20},
    "prune": {"kind": "unstructured", "scope": "layerwise", "rate": 0.2, "output_rate": 0.1, "levels": 1},
    "device": "cpu",
}


def write(tmp_path, data, name="trial.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_(base, path, value):
    data = json.loads(json.dumps(base))
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


# ---------------------------------------------------------------- spec


def test_key_hashes_only_non_default_science_fields():
    # pinned: a change to the key function would orphan every stored run
    assert TrialSpec().key == "44136fa355b3"  # sha256 of "{}": nothing differs from the defaults
    spec = from_dict(QUICK)
    assert spec.key == "d489b672fb47"
    assert spec.key == from_dict({**QUICK, "device": "cuda"}).key
    assert spec.key == from_dict(with_(QUICK, "dataset.data_dir", "/elsewhere")).key
    assert spec.key != from_dict({**QUICK, "seed": 1}).key
    assert spec.key != from_dict(with_(QUICK, "prune.rate", 0.3)).key


def test_spec_is_frozen_typed_and_round_trips():
    spec = from_dict(with_(QUICK, "train.milestones", [20, 40]))
    assert spec.train.milestones == (20, 40) and isinstance(spec.train.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3
    assert from_dict(spec.to_dict()) == spec
    assert spec.replace(seed=4).seed == 4
    assert from_dict({"model": "conv2", "dataset": "cifar10"}).model.name == "conv2"


def test_every_preset_is_valid():
    for name in preset_names():
        spec = trial_spec(preset_name=name)
        assert spec.prune.levels >= 1, name
    lenet = trial_spec(preset_name="lenet_mnist_frankle2019")
    assert (lenet.train.optimizer, lenet.train.lr, lenet.train.batch_size, lenet.train.iterations) == \
        ("adam", 1.2e-3, 60, 50000)
    assert (lenet.prune.scope, lenet.prune.rate, lenet.prune.output_rate) == ("layerwise", 0.2, 0.1)


def test_set_overrides_any_path(tmp_path):
    spec = trial_spec(write(tmp_path, QUICK), overrides=["prune.rate=0.3", "train.milestones=[10, 30]",
                                                           "prune.layer_rates.hidden.0=0.5", "model=conv2"])
    assert spec.prune.rate == 0.3 and spec.train.milestones == (10, 30)
    assert dict(spec.prune.layer_rates) == {"hidden.0": 0.5} and spec.model.name == "conv2"


def test_config_may_start_from_a_preset(tmp_path):
    spec = trial_spec(write(tmp_path, {"preset": "lenet_mnist_frankle2019", "prune": {"levels": 3}}))
    assert spec.prune.levels == 3 and spec.prune.output_rate == 0.1 and spec.train.iterations == 50000


# ---------------------------------------------------------------- bad input

BAD = [
    ({**QUICK, "colour": "red"}, "colour"),
    (with_(QUICK, "train.lrr", 0.1), "train.lrr"),
    (with_(QUICK, "prune.rate", 1.5), "prune.rate"),
    (with_(QUICK, "prune.rate", 0), "prune.rate"),
    ({**QUICK, "rewind_iteration": 60}, "rewind_iteration"),
    ({**QUICK, "model": "lenet_5"}, "model.name"),
    (with_(QUICK, "dataset.name", "imagenet"), "dataset.name"),
    ({**QUICK, "prune": {"kind": "structured", "layer_rates": {"conv9": 0.2}}}, "prune.layer_rates.conv9"),
    ({**QUICK, "prune": {"kind": "structured", "layer_rates": {"fc": 0.2}}}, "prune.layer_rates.fc"),
    ({**QUICK, "prune": {"kind": "structured", "scope": "global"}}, "prune.scope"),
    (with_(QUICK, "train.momentum", 0.9), "train.momentum"),
    (with_(QUICK, "train.batch_size", "big"), "train.batch_size"),
    (with_(QUICK, "train.milestones", [40, 20]), "train.milestones"),
    (with_(QUICK, "dataset.name", "mnist1d") | {"model": "conv2"}, "model.name"),
    ({**QUICK, "control": "scramble"}, "control"),
    ({**QUICK, "device": "tpu"}, "device"),
    (with_(QUICK, "train.batch_size", 5000), "train.batch_size"),  # larger than digits' train split
]


@pytest.mark.parametrize("data,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_one_line_exit_2_nothing_written(tmp_path, capsys, data, key):
    out = tmp_path / "out"
    code = main(["trial", "run", str(write(tmp_path, data)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"lth: error: {key}: ")
    assert not out.exists()


@pytest.mark.parametrize("argv,key", [
    (["--set", "prune.rat=0.3"], "prune.rat"),
    (["--set", "prune.rate=abc"], "prune.rate"),
    (["--set", "prune.rate"], "--set"),
    (["--preset", "lenet_1990"], "preset"),
])
def test_bad_command_line(tmp_path, capsys, argv, key):
    out = tmp_path / "out"
    code = main(["trial", "run", str(write(tmp_path, QUICK)), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"lth: error: {key}: ") and not out.exists()


def test_unreadable_or_non_mapping_config(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for path in (tmp_path / "list.yaml", tmp_path / "missing.yaml"):
        assert main(["trial", "run", str(path), "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.startswith("lth: error: config: ")
    assert not (tmp_path / "o").exists()


def test_torchvision_root_without_files(tmp_path, capsys):
    data = with_(QUICK, "dataset", {"name": "mnist", "data_dir": str(tmp_path / "empty")})
    assert main(["trial", "run", str(write(tmp_path, data)), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("lth: error: dataset.data_dir: ")
    assert not (tmp_path / "o").exists() and not (tmp_path / "empty").exists()


def test_cli_runs_resumes_and_refuses_another_trials_folder(tmp_path, capsys):
    config, out = write(tmp_path, QUICK), tmp_path / "out"
    assert main(["trial", "run", str(config), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "level 1/1 done" in captured.err and captured.out.splitlines()[0].split()[:3] == \
        ["level", "density", "params"]
    assert len(captured.out.strip().splitlines()) == 3  # header + levels 0 and 1
    # what it said it would train is what ran: level 0 (dense) and 1 pruned level (QUICK: k = 0)
    assert f"2 levels (dense, 1 pruned) x {QUICK['train']['iterations']} iterations -> {out}" in captured.err
    stamp = (out / "level_01" / "DONE").stat().st_mtime_ns
    assert main(["trial", "run", str(config), "--out", str(out)]) == 0  # all done: nothing retrained
    assert (out / "level_01" / "DONE").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(["trial", "run", str(config), "--out", str(out), "--set", "seed=5"]) == 2
    assert capsys.readouterr().err.startswith("lth: error: --out: ")


def test_console_script_exit_code(tmp_path):
    """The installed `lth` really exits 2 with one line (not just main()'s return value)."""
    lth = __import__("shutil").which("lth") or str(__import__("pathlib").Path(sys.executable).parent / "lth")
    bad = write(tmp_path, with_(QUICK, "prune.rate", 1.5))
    proc = subprocess.run([lth, "trial", "run", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lth: error: prune.rate: 1.5 is not allowed; allowed: 0 < rate < 1"


def test_the_program_ends_with_a_thread_pool_still_up():
    """`lth` ends the way Python's own exit does (lth/cli.py entry): a thread pool's idle worker,
    which an MLflow artifact download leaves behind, is told to stop before threads are
    joined, not waited for (the program hung there at the end of a sweep)."""
    code = ("import sys; from concurrent.futures import ThreadPoolExecutor; import lth.cli; pools = []\n"
            "def main(argv=None):\n"
            "    pools.append(ThreadPoolExecutor(1)); pools[0].submit(print, 'done'); return 3\n"
            "lth.cli.main = main; lth.cli.entry()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "done\n"), proc.stderr[-2000:]


def test_prune_spec_direct_construction_is_validated_by_trial_spec():
    with pytest.raises(Exception, match="prune.rate"):
        TrialSpec(prune=PruneSpec(rate=2.0))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_on_a_machine_without_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["trial", "run", str(write(tmp_path, QUICK)), "--out", str(out), "--set", "device=cuda"]) == 2
    assert capsys.readouterr().err.startswith("lth: error: device: 'cuda' is not allowed; this machine has 0")
    assert not out.exists()


def test_trial_run_names_every_level_it_trains():
    from lth.trial_commands import levels_text
    from trials.spec import SupermaskSpec

    spec = from_dict(QUICK).replace(prune=PruneSpec(levels=2), rewind_iteration=20)
    t = spec.train.iterations
    assert levels_text(spec) == f"3 levels (dense, 2 pruned) x {t} iterations dense, {t - 20} pruned"
    assert levels_text(spec.replace(prune=PruneSpec(levels=0), rewind_iteration=0)) == \
        f"1 level (dense only) x {t} iterations"
    popup = spec.replace(method="edge_popup", rewind_iteration=0, supermask=SupermaskSpec(densities=(0.5, 0.3)))
    assert levels_text(popup) == f"2 levels (one per density) x {t} iterations"


def test_trial_presets_fit_the_terminal_width(capsys, monkeypatch):
    for columns in ("80", "50"):
        monkeypatch.setenv("COLUMNS", columns)
        assert main(["trial", "presets"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines and all(len(line) <= int(columns) for line in lines), columns
        names = [line for line in lines if line and not line[0].isspace()]
        assert [n.split()[0] for n in names] == preset_names()
