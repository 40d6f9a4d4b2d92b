"""Ablation tables and plots from a real MLflow store holding known runs."""
import statistics

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

import analysis
from lth.cli import main

# (kind, rewind) -> seed -> accuracy per level; densities per level are the same for all
KNOWN = {
    ("unstructured", 0): {0: [0.950, 0.960, 0.940], 1: [0.955, 0.950, 0.945], 2: [0.945, 0.962, 0.951]},
    ("structured", 0): {0: [0.950, 0.930, 0.920], 1: [0.952, 0.925, 0.915], 2: [0.949, 0.931, 0.900]},
    ("unstructured", 500): {0: [0.950, 0.965], 1: [0.955, 0.970]},  # seed 2 missing; one level fewer
}
DENSITY = [1.0, 0.8, 0.64]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('analysis') / 'known.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("known")
    for (kind, rewind), seeds in KNOWN.items():
        for seed, accs in seeds.items():
            run = c.create_run(exp, run_name=f"{kind}-{rewind}-{seed}", tags={
                "lth.kind": "trial", "lth.trial_key": f"{kind}-{rewind}-{seed}", "lth.sweep": "s"})
            params = {"model.name": "lenet_300_100", "dataset.name": "digits", "train.lr": "0.001",
                      "train.milestones": "[]", "dataset.data_dir": "None", "prune.kind": kind,
                      "prune.rate": "0.2", "rewind_iteration": str(rewind), "control": "none", "seed": str(seed)}
            c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            c.log_batch(run.info.run_id, metrics=[
                m for level, acc in enumerate(accs) for m in (
                    Metric("test_acc_at_early_stop", acc, 0, level), Metric("test_acc", acc - 0.01, 0, level),
                    Metric("density", DENSITY[level], 0, level), Metric("early_stop_iteration", 100 * (level + 1), 0, level))])
            c.set_terminated(run.info.run_id)
    return uri


def hand(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def test_runs_is_tidy_and_typed(store):
    df = analysis.runs("known", store)
    assert len(df) == 3 * 3 + 3 * 3 + 2 * 2  # one row per trial x level
    assert str(df["seed"].dtype) == "Int64" and str(df["rewind_iteration"].dtype) == "Int64"
    assert str(df["train.lr"].dtype) == "Float64" and str(df["level"].dtype) == "Int64"
    assert df["train.milestones"].iloc[0] == () and df["dataset.data_dir"].isna().all()
    assert set(df["status"]) == {"FINISHED"}


def test_table_cells_are_hand_computed_means_and_stds(store):
    table = analysis.ablation(analysis.runs("known", store), ["prune.kind", "rewind_iteration"])
    assert table.columns == ["L0", "L1", "L2"]
    for (kind, rewind), seeds in KNOWN.items():
        for level in range(3):
            values = [accs[level] for accs in seeds.values() if level < len(accs)]
            cell = table.cell((kind, str(rewind)), f"L{level}")
            if not values:
                assert cell is None  # missing stays missing
                continue
            mean, std, n = hand(values)
            assert (cell["mean"], cell["std"], cell["n"]) == (pytest.approx(mean), pytest.approx(std), n)
            dense_mean, dense_std, _ = hand([accs[0] for accs in seeds.values()])
            assert bool(cell["matches"]) == (mean >= dense_mean - ((std ** 2 + dense_std ** 2) / 2) ** 0.5)
    # the dense baseline counts each distinct dense network once: 3 seeds (rewind does not change level 0)
    assert table.dense["n"] == 3
    best_l1 = max(((k, r) for k, r in KNOWN), key=lambda g: statistics.mean(a[1] for a in KNOWN[g].values()))
    assert table.cell((best_l1[0], str(best_l1[1])), "L1")["best"]


def test_target_densities_pick_the_nearest_level_and_say_so(store):
    df = analysis.runs("known", store)
    table = analysis.ablation(df, ["prune.kind"], densities=[1.0, 0.6, 0.1])
    assert table.columns == ["1", "0.6", "0.1"]
    cell = table.cell(("unstructured",), "0.6")
    assert cell["level"] == 2 and cell["density"] == pytest.approx(0.64)
    assert table.cell(("unstructured",), "0.1") is None  # no level within a factor 1.25 of 10%
    md = analysis.to_markdown(table)
    assert "@64.0%" in md and "≈60%" in md and "| — |" in md


def test_latex_has_booktabs_rules_and_one_row_per_group(store):
    table = analysis.ablation(analysis.runs("known", store), ["prune.kind", "rewind_iteration"])
    tex = analysis.to_latex(table)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in tex
    body = tex.split(r"\midrule")[-1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 3 and sorted(line.split(" & ")[0] for line in body) == [
        "structured", "unstructured", "unstructured"]
    assert "---" in body[[line.split(" & ")[1] for line in body].index("500")]  # L2 of rewind 500 is missing
    assert r"\textbf{" in tex and r"$^\dagger$" in tex and r"\sqrt" in tex  # marks and their stated rule
    csv = analysis.to_csv(table)
    assert csv.splitlines()[0] == "prune.kind,rewind_iteration,column,level,density,mean,std,n,best,matches"
    assert len(csv.splitlines()) == 1 + 3 + 3 + 2


def test_different_prune_rates_need_target_densities(store, tmp_path, capsys):
    df = analysis.runs("known", store)
    df.loc[df["prune.kind"] == "structured", "prune.rate"] = 0.5
    with pytest.raises(Exception, match="--density"):
        analysis.ablation(df, ["prune.kind"])
    assert main(["report", "table", "--experiment", "known", "--rows", "prune.speed", "--tracking-uri", store]) == 2
    assert capsys.readouterr().err.startswith("lth: error: --rows: 'prune.speed' is not allowed")


def test_report_cli_writes_table_and_plots(store, tmp_path, capsys):
    for fmt, name in (("latex", "t.tex"), ("markdown", "t.md"), ("csv", "t.csv")):
        assert main(["report", "table", "--experiment", "known", "--rows", "prune.kind,rewind_iteration",
                     "--format", fmt, "--out", str(tmp_path / name), "--tracking-uri", store]) == 0
        assert (tmp_path / name).stat().st_size > 200
    for name in ("imp.png", "imp.pdf"):
        assert main(["report", "plot", "--experiment", "known", "--out", str(tmp_path / name),
                     "--rows", "prune.kind", "--tracking-uri", store]) == 0
        data = (tmp_path / name).read_bytes()
        assert len(data) > 5000 and data[:4] in (b"\x89PNG", b"%PDF")
    assert main(["report", "plot", "--experiment", "known", "--out", str(tmp_path / "imp.svg"),
                 "--tracking-uri", store]) == 2
    assert main(["report", "table", "--experiment", "known", "--density", "0,2", "--tracking-uri", store]) == 2
