"""A sweep's bookkeeping (ARCHITECTURE.md, "The trial folder" and "The sweep runner"):
masks stored as bits and read in both forms."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trials.folder import layout
from trials.nets import masks
from trials.folder.store import MASK_BITS, MASK_FORMAT, load_tensors, save_mask


def test_masks_are_stored_as_bits_and_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = {"fc1.weight": torch.rand(300, 64, generator=g) < 0.3, "odd": torch.rand(7, 3, generator=g) < 0.5,
            "scalar": torch.tensor(True), "empty": torch.zeros(0, 4, dtype=torch.bool)}
    save_mask(tmp_path / layout.MASK, mask)
    back = load_tensors(tmp_path / layout.MASK)
    assert set(back) == set(mask)
    for name, m in mask.items():
        assert back[name].dtype == torch.bool and back[name].shape == m.shape and torch.equal(back[name], m)
    save_file({k: v.contiguous() for k, v in mask.items()}, str(tmp_path / "bool.safetensors"))
    bytes_bool = (tmp_path / "bool.safetensors").stat().st_size
    assert (tmp_path / layout.MASK).stat().st_size < bytes_bool / 6  # 1 bit a weight, plus the header
    from safetensors import safe_open

    with safe_open(str(tmp_path / layout.MASK), framework="pt") as f:
        assert f.metadata()[MASK_FORMAT] == MASK_BITS


def test_a_mask_of_the_previous_layout_one_byte_per_weight_still_reads(tmp_path):
    mask = masks.ones(masks.Layers.of(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))))
    mask["0.weight"][1, 2] = False
    save_file(mask, str(tmp_path / "old.safetensors"))  # what the engine wrote before bits
    back = load_tensors(tmp_path / "old.safetensors")
    assert all(torch.equal(back[k], mask[k]) and back[k].dtype == torch.bool for k in mask)


# ------------------------------------------------------------ trial folders in storage (folders.py)


def _folder_with_levels(tmp_path, levels: int):
    """A real trial folder of `levels` + 1 levels (the engine, no Ray)."""
    from tests.conftest import digits_base
    from trials.runner.levels import run_lottery
    from trials.spec import from_dict

    base = digits_base(levels=levels)
    base["train"].update(iterations=20, eval_interval=10)
    spec = from_dict(base)
    out = tmp_path / "local"
    run_lottery(spec, out)
    return spec, out


def test_a_trial_folder_goes_to_storage_once_and_comes_back_whole(tmp_path):
    import json
    import shutil

    from orchestrator.sweeps.folders import Mirror, wanted
    from trials.folder.store import TrialDir

    spec, out = _folder_with_levels(tmp_path, levels=2)
    remote = tmp_path / "storage" / "trials" / "t0"
    mirror = Mirror(out, str(remote), "last")
    assert mirror.push() > 0 and mirror.push() == 0  # nothing changed: nothing sent again
    stored = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    assert stored == ["level_00/mask.safetensors", "level_01/mask.safetensors", "level_02/final.safetensors",
                      "level_02/mask.safetensors", "levels.jsonl", "rewind.safetensors", "spec.json"]
    assert wanted(out, "all")[1] == []  # keep_finals: all drops nothing
    # a lost worker: the folder comes back from storage, records and DONE markers included
    back = tmp_path / "back"
    assert Mirror(back, str(remote), "last").pull()
    trial = TrialDir(back, spec)
    assert trial.first_missing(spec.last_level) == spec.last_level + 1
    for lv in range(3):
        assert trial.record(lv) == TrialDir(out, spec).record(lv)
        assert all(torch.equal(a, b) for a, b in zip(trial.mask(lv).values(), TrialDir(out, spec).mask(lv).values()))
    assert all(torch.equal(trial.final(2)[k], v) for k, v in TrialDir(out, spec).final(2).items())
    # a push cut short after a level's tensors, before its line in levels.jsonl: the level is
    # removed on the way back (the engine redoes it), the one before it is whole
    cut = tmp_path / "cut"
    levels = (out / "levels.jsonl").read_text()
    (out / "level_02" / "DONE").unlink()  # the folder as it stood after level 1
    (out / "levels.jsonl").write_text("".join(levels.splitlines(keepends=True)[:2]))
    Mirror(out, str(cut), "last").push()
    shutil.copytree(out / "level_02", cut / "level_02", ignore=shutil.ignore_patterns("DONE", "record.json"))
    shutil.rmtree(back)
    assert Mirror(back, str(cut), "last").pull()
    assert TrialDir(back, spec).first_missing(spec.last_level) == 2 and not (back / "level_02").exists()
    assert [json.loads(line)["level"] for line in (back / "levels.jsonl").read_text().splitlines()] == [0, 1]
    assert (back / "level_01" / "final.safetensors").exists()


def test_an_older_final_leaves_storage_once_a_newer_level_is_stored(tmp_path):
    from orchestrator.sweeps.folders import Mirror

    spec, out = _folder_with_levels(tmp_path, levels=2)
    done = out / "level_02" / "DONE"
    done.unlink()  # as the folder stood after level 1
    remote = tmp_path / "storage"
    for keep, kept in (("last", {1}), ("all", {0, 1})):
        mirror = Mirror(out, str(remote / keep), keep)
        mirror.push()
        assert {lv for lv in range(3) if (remote / keep / f"level_{lv:02d}" / "final.safetensors").exists()} == kept
    done.write_text("")
    for keep, kept in (("last", {2}), ("all", {0, 1, 2})):
        Mirror(out, str(remote / keep), keep).push()
        assert {lv for lv in range(3) if (remote / keep / f"level_{lv:02d}" / "final.safetensors").exists()} == kept


# ------------------------------------------------------------ a real sweep


def _sweep(tmp_path, name="books", **fields):
    import yaml

    from tests.conftest import digits_base

    data = {"name": name, "experiment": "books", "base": digits_base(levels=2),
            "space": {"control": {"grid": ["none", "random_prune"]}}, "seeds": 2, "pack": 4,
            "resources": {"cpu": 1}, "max_concurrent": 2, "storage": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def books_sweep(tmp_path_factory, ray_local):
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    tmp = tmp_path_factory.mktemp("books")
    runner.run(load_sweep(_sweep(tmp)))
    return tmp


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_storage_holds_each_file_once_and_mlflow_no_tensors(books_sweep):
    import json

    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    tmp = books_sweep
    sweep = tmp / "runs" / "books"
    trials = sorted((sweep / "trials").iterdir())
    assert len(trials) == 4
    for t in trials:
        spec = json.loads((t / "spec.json").read_text())["spec"]
        top = ["level_00/mask.safetensors", "levels.jsonl", "nodes.json", "rewind.safetensors", "spec.json",
               "units.json"]
        if spec["control"] == "none":  # a ticket's levels >= 1 are its trunk's units: not copied
            assert _files(t) == top
        else:  # a control's own levels are its own; its IMP run's are units
            assert _files(t) == sorted(top + ["imp/level_00/mask.safetensors", "imp/levels.jsonl",
                                              "imp/rewind.safetensors", "imp/spec.json",
                                              "level_01/mask.safetensors", "level_02/final.safetensors",
                                              "level_02/mask.safetensors"])
        with safe_open(str(t / "level_00" / "mask.safetensors"), framework="pt") as f:
            assert f.metadata()[MASK_FORMAT] == MASK_BITS
        assert json.loads((t / "units.json").read_text())["root"] == str(tmp / "runs" / "_units" / "_packed")
    checkpoints = [p for p in sweep.rglob("checkpoint_*") if p.is_dir()]
    assert checkpoints and all(_files(c) == ["pack.json"] for c in checkpoints)  # the pack's state alone
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("books").experiment_id], "tags.`lth.kind` = 'trial'")
    assert len(runs) == 4
    for r in runs:
        assert not c.list_artifacts(r.info.run_id)
        assert r.data.tags["lth.folder"] == str(sweep / "trials" / r.data.tags["lth.tune_trial_id"])
        assert [m.step for m in c.get_metric_history(r.info.run_id, "test_acc")] == [0, 1, 2]


def test_tickets_export_from_a_run_id_every_level_and_on_demand_to_mlflow(books_sweep, tmp_path, capsys):
    import json

    from mlflow.tracking import MlflowClient

    from lth.cli import main
    from trials import load_ticket

    uri = f"sqlite:///{books_sweep / 'mlflow.db'}"
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("books").experiment_id], "tags.`lth.kind` = 'trial'")
    for r in runs:
        for level in (0, 1, 2):
            out = tmp_path / f"{r.info.run_id}-{level}"
            assert main(["tickets", "export", r.info.run_id, "--level", str(level), "--out", str(out),
                         "--tracking-uri", uri]) == 0
            if level == 2 or r.data.tags["control"] == "none" or level == 0:  # kept, or a unit's
                ticket = load_ticket(out)
                assert ticket.evaluate()[1] == ticket.record.test_acc
            else:  # a control's level 1: its final weights were not kept (keep_finals: last)
                with pytest.raises(ValueError, match="keep_finals: all"):
                    load_ticket(out)
                assert load_ticket(out, weights="rewind").record.level == 1
    capsys.readouterr()
    assert main(["tickets", "best", "--experiment", "books", "--tracking-uri", uri, "--top", "2", "--export",
                 "--format", "json"]) == 0
    best = [r["run_id"] for r in json.loads(capsys.readouterr().out)]
    logged = [r for r in runs if c.list_artifacts(r.info.run_id, "ticket")]
    assert {r.info.run_id for r in logged} <= set(best) and logged
    run_id = logged[0].info.run_id
    files = {f.path for f in c.list_artifacts(run_id)} | {f.path for f in c.list_artifacts(run_id, "ticket")}
    assert {"spec.json", "levels.jsonl", "ticket/rewind.safetensors"} <= files


def test_keep_finals_all_keeps_every_level(tmp_path, ray_local):
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    runner.run(load_sweep(_sweep(tmp_path, "all", keep_finals="all", share=False, pack=1, seeds=1,
                                 space={})))
    (trial,) = (tmp_path / "runs" / "all" / "trials").iterdir()
    assert all((trial / f"level_{lv:02d}" / "final.safetensors").exists() for lv in range(3))


def pickled_modules(sweep, package: str) -> set:
    """The modules of `package` that a sweep's Tune pickles (the tuner, each trial's params)
    name: a resume unpickles them with the code of the day."""
    import pickletools

    modules, paths = set(), [*sweep.glob("*.pkl"), *sweep.glob("*/*.pkl")]
    assert paths, f"no pickles in {sweep}"
    for path in paths:
        pushed: list = []  # what each op pushed, as far as names go (strings, memo reads)
        memo: dict = {}
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if op.name == "GLOBAL":  # protocols < 4: "module name"
                modules.add(arg.split(" ")[0])
            elif op.name == "STACK_GLOBAL":  # the module and name: the two values pushed before it
                modules.add(pushed[-2])
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(int(arg)))
            elif isinstance(arg, str):
                pushed.append(arg)
            elif op.name not in ("FRAME", "PROTO", "BINPUT", "LONG_BINPUT", "PUT"):
                pushed.append(None)
    assert any(str(m).startswith("orchestrator.") for m in modules), modules  # the check reads the names
    return {m for m in modules if isinstance(m, str) and (m == package or m.startswith(package + "."))}


PREVIOUS_LAYOUT = "a714575"  # the last commit whose checkpoints held the members' folders


def test_a_sweep_of_the_previous_layout_resumes_and_reads(tmp_path):
    """A sweep started by the lth before trial folders in storage (its checkpoints hold the
    members' folders), its driver killed mid-sweep, is finished by this lth: nothing
    trained twice, the levels it had sent to storage, every table and ticket readable."""
    import io
    import json
    import os
    import signal
    import subprocess
    import sys
    import tarfile
    import time
    from pathlib import Path

    import pandas as pd

    from lth.cli import main
    from tests.conftest import LTH, digits_base
    from trials import load_ticket

    repo = Path(__file__).resolve().parent.parent
    blob = subprocess.run(["git", "-C", str(repo), "archive", PREVIOUS_LAYOUT, "lth", "orchestrator", "trials"],
                          capture_output=True)
    if blob.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_LAYOUT} is not in this checkout's history")
    old = tmp_path / "old"
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        tar.extractall(old, filter="data")
    base = digits_base(levels=3)
    base["train"].update(iterations=200, eval_interval=50)
    path = _sweep(tmp_path, "s", base=base, space={"prune.rate": {"grid": [0.2, 0.4]}}, pack=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(old)}
    proc = subprocess.Popen([sys.executable, "-m", "lth", "sweep", "run", str(path)], cwd=tmp_path, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = [], time.time() + 300
    while time.time() < deadline and sum(" level " in s and "density" in s for s in seen) < 5:
        seen.append(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sum(" level " in s and "density" in s for s in seen) < 16, "the sweep finished before the kill"
    sweep = tmp_path / "runs" / "s"
    assert not (sweep / "trials").exists()  # the previous layout
    time.sleep(3)
    resumed = subprocess.run([LTH, "sweep", "resume", "s", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not pickled_modules(sweep, "trials"), "Tune's pickles name engine modules: moving trials/ breaks a resume"
    df = pd.read_csv(sweep / "trials.csv")
    assert len(df) == 4 * 4 and set(df.status) == {"TERMINATED"}
    for pack_dir in sweep.glob("*_0000*"):
        reported = [json.loads(line) for line in (pack_dir / "result.json").read_text().splitlines()]
        for member in range(2):
            stored = [json.loads(line) for line in
                      (sweep / "trials" / f"{pack_dir.name}_{member:02d}" / "levels.jsonl").read_text().splitlines()]
            assert [r["level"] for r in stored] == [0, 1, 2, 3]
            for r in (n for result in reported for n in result["pack_new"] if n["member"] == member):
                assert r["seconds"] == stored[r["level"]]["seconds"], "a level trained twice"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", "status", "s", "--storage", str(tmp_path / "runs")]) == 0
    for r in json.loads(subprocess.run([LTH, "tickets", "best", "--experiment", "books", "--tracking-uri", uri,
                                        "--top", "16", "--format", "json"], capture_output=True, text=True).stdout):
        out = tmp_path / "t" / f"{r['run_id']}-{r['level']}"
        assert main(["tickets", "export", r["run_id"], "--level", str(r["level"]), "--out", str(out),
                     "--tracking-uri", uri]) == 0
        ticket = load_ticket(out) if (out / "final.safetensors").exists() else load_ticket(out, weights="rewind")
        assert ticket.record.level == r["level"]
