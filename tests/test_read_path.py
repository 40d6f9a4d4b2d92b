"""The read path at scale: analysis.runs and experiment_tickets.best take trial runs and levels
from the sweeps' levels tables (one download per sweep) and give exactly what reading
MLflow run by run gives. A real sweep on a local Ray, a real SQLite MLflow store."""
import json

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

import analysis
from orchestrator.sweep_spec import load_sweep
from orchestrator.sweeps import runner
from orchestrator.tracking import levels_table, read, experiment_tickets
from tests.test_analysis import layout_problems
from tests.test_tracking import sweep_file
from trials.folder.environment import cpu_model, mixed
from trials.folder.record import TRACKED, LevelRecord, read_lines

N_TRIALS, LEVELS = 4, 2


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("read_path")
    path = sweep_file(tmp, name="read")
    runner.run(load_sweep(path))
    return tmp, path, f"sqlite:///{tmp / 'mlflow.db'}"


def trial_runs(uri):
    c = MlflowClient(uri)
    return c, c.search_runs([read.experiment_id(c, "exp", uri)], "tags.`lth.kind` = 'trial'")


def table(c, runs) -> pd.DataFrame:
    parents = {r.data.tags[read.PARENT] for r in runs}
    assert len(parents) == 1
    return levels_table.download(c, parents.pop())


def states(runs) -> dict:
    return {r.info.run_id: r.data.tags.get(levels_table.STATE_TAG) for r in runs}


def assert_paths_agree(uri) -> pd.DataFrame:
    df = analysis.runs("exp", uri)
    pd.testing.assert_frame_equal(df, analysis.runs("exp", uri, tables=False))
    named = [e for envs in df["environments"].dropna() for e in json.loads(envs)]  # the runs' environments
    assert named and all(e["cpu"] == cpu_model() and e["lth"] for e in named) and mixed(df["environments"]) is None
    for metric in ("test_acc_at_early_stop", "test_acc"):
        ranked = experiment_tickets.best("exp", uri, metric=metric, top=10 ** 6)
        assert ranked == experiment_tickets.best("exp", uri, metric=metric, top=10 ** 6, tables=False)
        assert len(ranked) == len(df)
    assert experiment_tickets.best("exp", uri, max_density=0.6, min_acc=0.1) == \
        experiment_tickets.best("exp", uri, max_density=0.6, min_acc=0.1, tables=False)
    return df


def test_the_table_holds_every_record_and_both_paths_agree(swept):
    tmp, _, uri = swept
    c, runs = trial_runs(uri)
    rows = table(c, runs)
    assert len(rows) == N_TRIALS * (LEVELS + 1) and not rows.duplicated(["run_id", "level"]).any()
    assert set(states(runs).values()) == {"current"}  # every run is read from the table
    assert set(rows["status"]) == {"FINISHED"}
    by_key = {key: [LevelRecord.from_flat(row) for row in part.sort_values("level").to_dict("records")]
              for key, part in rows.groupby("trial_key", observed=True)}
    folders = list((tmp / "runs" / "read" / "trials").iterdir())  # the records the trials wrote
    assert len({json.loads((f / "spec.json").read_text())["key"] for f in folders}) == N_TRIALS
    for trial in folders:
        key = json.loads((trial / "spec.json").read_text())["key"]
        for record in read_lines((trial / "levels.jsonl").read_text()):
            assert by_key[key][record.level] == record
    df = assert_paths_agree(uri)
    assert len(df) == N_TRIALS * (LEVELS + 1)
    assert (df["effective_density"] > 0).all() and (df["effective_density"] <= df["density"]).all()  # for analysis
    # a real sweep's output drawn: every legend entry and tick inside the figure, no two lines alike
    fig = analysis.plots.imp_figure(df, ["prune.kind"])
    assert layout_problems(fig) == [] and len(fig.axes[0].get_lines()) == 2
    ablation = analysis.ablation(df, ["prune.kind"])
    assert ablation.read["trials"] == N_TRIALS and ablation.split == [] and set(ablation.cells["n"]) == {2}
    effective = analysis.with_density(df, "effective")  # `--density-kind effective`: the records carry it
    assert list(effective["density"]) == list(df["effective_density"])
    assert layout_problems(analysis.plots.imp_figure(effective, ["prune.kind"])) == []


def test_rerun_and_resume_keep_one_row_per_level(swept):
    tmp, path, uri = swept
    c, runs = trial_runs(uri)  # a driver that died between an upload and marking its runs current:
    c.set_tag(runs[0].info.run_id, levels_table.STATE_TAG, levels_table.STALE)
    runner.run(load_sweep(path))  # nothing left to run: the driver replays into MLflow
    runner.resume("read", str(tmp / "runs"))
    c, runs = trial_runs(uri)
    rows = table(c, runs)
    assert len(rows) == N_TRIALS * (LEVELS + 1) and not rows.duplicated(["run_id", "level"]).any()
    assert set(states(runs).values()) == {"current"}
    assert_paths_agree(uri)


def test_runs_the_table_does_not_hold_are_read_from_mlflow(swept):
    """Runs last in this module: it changes the shared store (an old-style run, a level
    and a status the table lacks, a deleted run, then no table at all)."""
    tmp, _, uri = swept
    c, runs = trial_runs(uri)
    model, late, failed, gone = runs
    old = c.create_run(model.info.experiment_id, run_name="old", tags={  # as an lth without tables logged it
        **{k: v for k, v in model.data.tags.items() if k.startswith("lth.") and k != levels_table.STATE_TAG},
        read.PARENT: model.data.tags[read.PARENT], "lth.trial_key": "old"}).info.run_id
    c.log_batch(old, params=[Param(k, v) for k, v in model.data.params.items()],
                metrics=[Metric(m, 0.5 + level / 10, 0, level) for level in range(2) for m in TRACKED])
    # what a driver does between two uploads: a new level, a new status (each marks the run stale)
    c.log_batch(late.info.run_id, metrics=[Metric(m, 0.25, 0, LEVELS + 1) for m in TRACKED])
    c.set_terminated(failed.info.run_id, status="FAILED")
    for run in (late, failed):
        c.set_tag(run.info.run_id, levels_table.STATE_TAG, levels_table.STALE)
    c.delete_run(gone.info.run_id)

    df = assert_paths_agree(uri)
    assert len(df) == (N_TRIALS - 1) * (LEVELS + 1) + 2 + 1
    assert list(df[df["run_id"] == old]["level"]) == [0, 1]
    assert df[(df["run_id"] == late.info.run_id) & (df["level"] == LEVELS + 1)]["density"].tolist() == [0.25]
    assert set(df[df["run_id"] == failed.info.run_id]["status"]) == {"FAILED"}
    assert gone.info.run_id not in set(df["run_id"])

    for path in (tmp / "mlartifacts").rglob(levels_table.TABLE):  # the sweep's table lost: all from MLflow
        path.unlink()
    assert levels_table.download(c, model.data.tags[read.PARENT]) is None
    pd.testing.assert_frame_equal(assert_paths_agree(uri), df)
    runner.resume("read", str(tmp / "runs"))  # a driver without the table rebuilds it from storage
    assert len(levels_table.download(c, model.data.tags[read.PARENT])) >= (N_TRIALS - 1) * (LEVELS + 1)
    assert_paths_agree(uri)


def record(level: int) -> LevelRecord:
    return LevelRecord(level=level, density=0.8 ** level, layer_density={"fc": 0.8 ** level}, remaining_params=10,
                       test_acc=0.9, early_stop_iteration=20, test_acc_at_early_stop=0.91, val_loss=float("inf"),
                       val_acc=0.9, val_loss_at_early_stop=0.3, train_loss=0.2, start_iteration=0, iterations=60,
                       seconds=1.5)


def test_a_run_is_marked_current_only_when_the_uploaded_table_holds_all_it_logged(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    parent = c.create_run(exp).info.run_id
    run = c.create_run(exp, tags={levels_table.STATE_TAG: levels_table.STALE}).info.run_id
    table = levels_table.LevelsTable()
    table.set_head(levels_table.head(run, "key", "sweep", "RUNNING", "prune.rate", {"seed": "0"}))
    table.add(run, record(0))
    table.mark(run, {0, 1})  # level 1 is logged as metrics but not in the table yet
    table.publish(c, parent)
    assert c.get_run(run).data.tags[levels_table.STATE_TAG] == levels_table.STALE
    table.add(run, record(1))
    table.add(run, LevelRecord(**{**record(1).to_dict(), "test_acc": 0.1}))  # the first record stays
    table.publish(c, parent)
    assert c.get_run(run).data.tags[levels_table.STATE_TAG] == levels_table.CURRENT
    uploaded = levels_table.download(c, parent)
    assert list(uploaded["level"]) == [0, 1] and list(uploaded["test_acc"]) == [0.9, 0.9]
    (trial,) = levels_table.trials(uploaded, ("density", "val_loss"))
    assert trial["params"] == {"seed": "0"} and trial["levels"][1] == {"density": 0.8, "val_loss": levels_table.MLFLOW_MAX}
    pd.testing.assert_frame_equal(levels_table.LevelsTable(uploaded).frame(), table.frame())
