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
    # the trials of a kind differ in rewind_iteration: the rows are split by it, never pooled
    assert table.rows == ["prune.kind", "rewind_iteration"] and table.split == ["rewind_iteration"]
    cell = table.cell(("unstructured", "0"), "0.6")
    assert cell["level"] == 2 and cell["density"] == pytest.approx(0.64) and cell["n"] == 3
    assert table.cell(("unstructured", "0"), "0.1") is None  # no level within a factor 1.25 of 10%
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
    for name in ("imp.png", "imp.pdf", "imp.svg"):  # PNG for screens, PDF and SVG for papers
        assert main(["report", "plot", "--experiment", "known", "--out", str(tmp_path / name),
                     "--rows", "prune.kind", "--tracking-uri", store]) == 0
        data = (tmp_path / name).read_bytes()
        assert len(data) > 5000 and (data[:4] in (b"\x89PNG", b"%PDF") or b"<svg" in data[:1000])
    capsys.readouterr()
    assert main(["report", "plot", "--experiment", "known", "--out", str(tmp_path / "imp.jpg"),
                 "--tracking-uri", store]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "imp.jpg").exists()
    assert main(["report", "table", "--experiment", "known", "--density", "0,2", "--tracking-uri", store]) == 2


# ---------------------------------------------------------------- honest by default


def log_trial(c, exp, sweep, key, params, accs, metrics=None):
    run = c.create_run(exp, run_name=key, tags={"lth.kind": "trial", "lth.trial_key": key, "lth.sweep": sweep,
                                                "lth.varied": "rewind_iteration,control"})
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    extra = metrics or {}
    c.log_batch(run.info.run_id, metrics=[
        m for level, acc in enumerate(accs) for m in (
            Metric("test_acc_at_early_stop", acc, 0, level), Metric("test_acc", acc, 0, level),
            Metric("density", 0.8 ** level, 0, level), Metric("early_stop_iteration", 300, 0, level),
            *(Metric(name, values[level], 0, level) for name, values in extra.items()))])
    c.set_terminated(run.info.run_id)
    return run.info.run_id


BASE = {"model.name": "lenet_300_100", "dataset.name": "digits", "prune.rate": "0.2", "prune.kind": "unstructured",
        "train.iterations": "300"}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """Experiment `pooled`: sweep `a` (rewind k in {0, 4, 16, 64, 256}, control none and
    reinit, seeds 0-1), sweep `b` re-running a's k=0 trials (same keys) and its own
    seed 2, sweep `search` (Optuna-like prune rates, one seed each)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('pooled') / 'p.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("pooled")
    for k in (0, 4, 16, 64, 256):
        for control in ("reinit", "none"):
            for seed in (0, 1):
                params = {**BASE, "rewind_iteration": k, "control": control, "seed": seed}
                acc = 0.9 + k / 10000 - (control == "reinit") * 0.05 + seed / 1000
                log_trial(c, exp, "a", f"a-{k}-{control}-{seed}", params, [acc, acc])
                if k == 0:
                    log_trial(c, exp, "b", f"a-{k}-{control}-{seed}", params, [acc, acc])
    for control in ("reinit", "none"):
        log_trial(c, exp, "b", f"b-0-{control}-2", {**BASE, "rewind_iteration": 0, "control": control, "seed": 2},
                  [0.95, 0.95])
    s = c.create_experiment("search")
    for i, rate in enumerate((0.38909882815030883, 0.2113, 0.21134)):
        log_trial(c, s, "opt", f"o{i}", {**BASE, "prune.rate": rate, "rewind_iteration": 0, "control": "none",
                                         "seed": 0}, [0.9, 0.8])
    return uri


def test_a_trial_in_two_sweeps_counts_once_and_controls_get_rows_of_their_own(pooled, capsys):
    df = analysis.runs("pooled", pooled)
    assert df.attrs["read"] == {"experiment": "pooled", "sweeps": ["a", "b"], "trials": 22, "duplicates": 4}
    table = analysis.ablation(df, ["rewind_iteration"])
    assert table.rows == ["rewind_iteration", "control"] and table.split == ["control"]
    assert table.cell(("0", "none"), "L0")["n"] == 3  # seeds 0, 1 (once, not twice) and b's seed 2
    assert table.cell(("0", "reinit"), "L0")["mean"] == pytest.approx(statistics.mean([0.85, 0.851, 0.95]))
    md = analysis.to_markdown(table)
    assert "read 22 trials of experiment 'pooled', sweeps a, b (4 repeats counted once)" in md
    assert "rows split by control" in md
    # one sweep only
    only = analysis.runs("pooled", pooled, sweeps=["a"])
    assert only.attrs["read"]["trials"] == 20 and set(only["sweep"]) == {"a"}
    assert main(["report", "table", "--experiment", "pooled", "--sweep", "a", "--rows", "rewind_iteration",
                 "--tracking-uri", pooled]) == 0
    out = capsys.readouterr().out
    assert "read 20 trials of experiment 'pooled', sweep a\n" in out and "(n=2)" in out and "(n=3)" not in out
    assert main(["report", "table", "--experiment", "pooled", "--sweep", "a,nope", "--tracking-uri", pooled]) == 2
    err = capsys.readouterr().err
    assert err == "lth: error: --sweep: 'nope' is not allowed; allowed: a, b (the sweeps of experiment 'pooled')\n"


def test_rows_sort_by_value_none_first_and_search_floats_read_well(pooled):
    table = analysis.ablation(analysis.runs("pooled", pooled), ["rewind_iteration", "control"])
    assert table.groups() == [(k, c) for k in ("0", "4", "16", "64", "256") for c in ("none", "reinit")]
    body = analysis.to_markdown(table).split("| dense |")[1].splitlines()[1:]
    assert [line.split(" | ")[0].strip("| ") for line in body if line.startswith("|")] == \
        [k for k in ("0", "4", "16", "64", "256") for _ in range(2)]
    search = analysis.ablation(analysis.runs("search", pooled), ["prune.rate"], densities=[1.0])
    # 4 significant digits, more only where two draws would read alike (0.2113 and 0.21134)
    assert search.groups() == [("0.2113",), ("0.21134",), ("0.3891",)]
    md = analysis.to_markdown(search)
    assert "90.00 (n=1)" in md and "±" not in md.split("| dense |")[1].split("\n", 1)[1].split("\n\n")[0]


def test_effective_density_is_the_density_axis_when_asked(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'e.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("eff")
    for seed in (0, 1):
        log_trial(c, exp, "s", f"k{seed}", {**BASE, "rewind_iteration": 0, "control": "none", "seed": seed},
                  [0.9, 0.9, 0.9], metrics={"effective_density": [1.0, 0.5, 0.3]})
    df = analysis.runs("eff", uri)
    if "effective_density" not in df:  # records of an lth that does not track it yet: the flag refuses
        assert main(["report", "table", "--experiment", "eff", "--density-kind", "effective",
                     "--tracking-uri", uri]) == 2
        df = df.assign(effective_density=df["level"].map({0: 1.0, 1: 0.5, 2: 0.3}).astype(float))
    else:
        assert main(["report", "table", "--experiment", "eff", "--density-kind", "effective",
                     "--tracking-uri", uri]) == 0
        assert "L1 (50.0%)" in capsys.readouterr().out
    table = analysis.ablation(analysis.with_density(df, "effective"), ["prune.kind"], densities=[0.5, 0.3])
    assert table.cell(("unstructured",), "0.5")["level"] == 1 and table.cell(("unstructured",), "0.3")["level"] == 2
    fig = analysis.plots.imp_figure(analysis.with_density(df, "effective"), ["prune.kind"])
    assert sorted(round(x, 6) for x in fig.axes[0].get_lines()[0].get_xdata()) == [30.0, 50.0, 100.0]
    old = df.drop(columns=["effective_density"])
    with pytest.raises(Exception, match="no effective_density"):
        analysis.with_density(old, "effective")
    capsys.readouterr()
    assert main(["report", "plot", "--experiment", "known-none", "--density-kind", "mean", "--out",
                 str(tmp_path / "x.png"), "--tracking-uri", uri]) == 2
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- figures a reader can read


def layout_problems(fig) -> list:
    """What a reader could not read: a legend entry or tick label outside the figure, two
    lines of one panel alike in colour and style."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    problems = []
    texts = [t for legend in fig.legends for t in [*legend.get_texts(), legend.get_title()]]
    for ax in [a for a in fig.axes if a.get_visible()]:
        for axis in (ax.xaxis, ax.yaxis):  # the ticks drawn: those within the axis's view
            lo, hi = sorted(axis.get_view_interval())
            texts += [t for loc, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
                      if lo - 1e-9 * abs(hi) <= loc <= hi + 1e-9 * abs(hi)]
    for t in texts:
        if not t.get_visible() or not t.get_text():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            problems.append(f"outside the figure: {t.get_text()!r}")
    for ax in fig.axes:
        looks = [(to_hex(line.get_color()), str(line.get_linestyle()), str(line.get_marker()))
                 for line in ax.get_lines() if not line.get_label().startswith("_")]
        if len(set(looks)) < len(looks):
            problems.append(f"lines alike in {ax.get_title()!r}: {looks}")
    return problems


def prune_at_init_runs() -> "pd.DataFrame":
    """Levels shaped as sweeps/prune_at_init.yaml's: 6 methods x 4 controls x 2 seeds, 5
    levels at IMP's densities, every early stop at the last iteration (300)."""
    import pandas as pd

    rows = []
    for m, method in enumerate(("imp", "snip", "grasp", "synflow", "magnitude_init", "random_init")):
        for c, control in enumerate(("none", "shuffle", "invert", "reinit")):
            for seed in (0, 1):
                run = f"{method}-{control}-{seed}"
                for level in range(6):
                    rows.append({"run_id": run, "trial_key": run, "sweep": "prune-at-init", "status": "FINISHED",
                                 "method": method, "control": control, "seed": seed, "prune.rate": 0.55,
                                 "train.iterations": 300, "level": level, "density": 0.45 ** level,
                                 "test_acc_at_early_stop": 0.97 - 0.004 * level * (m + c) + 0.001 * seed,
                                 "early_stop_iteration": 300})
    return pd.DataFrame(rows)


def test_the_prune_at_init_figure_facets_by_method_and_fits(tmp_path):
    df = prune_at_init_runs()
    fig = analysis.plots.imp_figure(df, ["method", "control"])
    assert layout_problems(fig) == []
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"method = {m}" for m in (
        "imp", "grasp", "magnitude_init", "random_init", "snip", "synflow")]  # one per method, IMP first
    assert all(len(ax.get_lines()) == 4 for ax in panels)  # its controls
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["none", "invert", "reinit", "shuffle"]
    # the early-stop panel would be a flat line at the last iteration: left out, and the figure says so
    assert "early-stop iteration not drawn: every early stop at the last iteration" in fig.get_suptitle()
    for suffix in (".png", ".pdf", ".svg"):
        out = analysis.imp_curves(df, ["method", "control"], tmp_path / f"pai{suffix}")
        assert out.stat().st_size > 10_000


def test_the_demo_figure_encodes_two_fields_and_fits(store, tmp_path):
    df = analysis.runs("known", store)
    fig = analysis.plots.imp_figure(df, ["prune.kind", "rewind_iteration"])
    assert layout_problems(fig) == []
    acc = fig.axes[0]
    lines = {line.get_label(): line for line in acc.get_lines()}
    assert set(lines) == {"structured, 0", "unstructured, 0", "unstructured, 500"}
    # colour: the kind; line style: the rewind point
    assert lines["unstructured, 0"].get_color() == lines["unstructured, 500"].get_color() != \
        lines["structured, 0"].get_color()
    assert lines["unstructured, 0"].get_linestyle() == lines["structured, 0"].get_linestyle() != \
        lines["unstructured, 500"].get_linestyle()
    # every line at the densities its own trials reached
    assert list(lines["unstructured, 500"].get_xdata()) == [pytest.approx(100 * d) for d in DENSITY[:2]]


def test_the_end_of_sweep_table_sorts_by_value_and_fits_80_columns():
    from types import SimpleNamespace

    from orchestrator.sweeps.results import summary_table

    rows = [{"rewind_iteration": k, "seed": seed, "level": level, "density": 0.8 ** level,
             "test_acc_at_early_stop": 0.9 + seed / 100}
            for k in (256, 0, 64, 4, 16) for seed in ((0,) if k == 4 else (0, 1)) for level in range(9)]
    text = summary_table(SimpleNamespace(varied=["rewind_iteration"]), rows, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    first = [line.split()[0] for line in text.splitlines() if line[:1].isdigit()]
    assert first[:5] == ["0", "4", "16", "64", "256"]  # numbers sort as numbers
    assert "90.00 (1)" in text and "±0.00 (1)" not in text  # one seed: no spread shown
    assert "L8 16.8%" in text  # every row reached the same density: said once, in the header


def test_tickets_best_says_what_it_read_and_fits_80_columns(pooled, capsys):
    assert main(["tickets", "best", "--experiment", "pooled", "--tracking-uri", pooled]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["read 22 trials of experiment 'pooled', sweeps a, b (4 repeats counted once)",
                       "best 10 (trial, level) pairs by test_acc_at_early_stop:"]
    assert max(len(line) for line in out) <= 80 and "run_id" in out[2] and "rewind_iteration" in "\n".join(out)
    assert main(["tickets", "best", "--experiment", "pooled", "--sweep", "b", "--columns", "sweep,seed,level",
                 "--top", "3", "--tracking-uri", pooled]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "read 6 trials of experiment 'pooled', sweep b"  # within one sweep, no repeats
    assert out[2].split() == ["sweep", "seed", "level"] and len(out) == 6
    assert main(["tickets", "best", "--experiment", "pooled", "--format", "csv", "--tracking-uri", pooled]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("run_id,trial_key,sweep,status,seed,")  # whole, for machines
    assert captured.err.startswith("read 22 trials")
    assert main(["tickets", "best", "--experiment", "pooled", "--columns", "seed,colour",
                 "--tracking-uri", pooled]) == 2
    assert capsys.readouterr().err.startswith("lth: error: --columns: 'colour' is not allowed; allowed: all, or")


def test_the_instability_figure_fits_and_encodes_group_and_level(tmp_path):
    import pandas as pd

    rows = [{"run_id": f"{kind}-{k}-{seed}", "seed": seed, "prune.kind": kind, "rewind_iteration": k, "level": level,
             "density": 0.5 ** level, "test_acc_at_early_stop": 0.9,
             "stability_error_barrier": 0.1 / (1 + k) + 0.01 * level + 0.001 * seed, "stability_loss_barrier": 0.5 / (1 + k)}
            for kind in ("unstructured", "structured") for k in (0, 4, 16, 64) for seed in (0, 1) for level in (0, 2)]
    fig = analysis.plots.instability_figure(pd.DataFrame(rows), ["prune.kind"])
    assert layout_problems(fig) == []
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:4] == ["level 0 (100%), structured", "level 2 (25%), structured", "level 0 (100%), unstructured",
                          "level 2 (25%), unstructured"] and labels[-1] == "stable below 2%"
    out = analysis.instability_curves(pd.DataFrame(rows), ["prune.kind"], tmp_path / "inst.png")
    assert out.stat().st_size > 10_000


def test_runs_logged_with_every_field_read_as_runs_logged_with_their_methods_fields(tmp_path):
    """A trial run logs the spec fields its method reads (trials/methods); runs logged before
    held every field (supermask.* and at_init.* on an IMP run). Both kinds read the same, so
    old and new runs of one configuration pool into one row."""
    import json

    from analysis.data import row_fields
    from tests.conftest import quick_spec
    from trials import methods
    from trials.spec import SupermaskSpec, flatten

    def logged(spec, every: bool) -> dict:
        flat = flatten(spec.to_dict())
        flat = flat if every else methods.get(spec.method).params(flat)
        return {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in flat.items()}

    c = MlflowClient(f"sqlite:///{tmp_path / 'mixed.db'}")
    exp = c.create_experiment("mixed")
    imp, popup = quick_spec(), quick_spec(method="edge_popup", supermask=SupermaskSpec(densities=(0.5, 0.3)))
    for seed, every in ((0, True), (1, False)):
        log_trial(c, exp, "s", f"imp-{seed}", logged(imp.replace(seed=seed), every), [0.9, 0.8])
        log_trial(c, exp, "s", f"ep-{seed}", logged(popup.replace(seed=seed), every), [0.7, 0.6])
    df = analysis.runs("mixed", f"sqlite:///{tmp_path / 'mixed.db'}")
    assert len(df) == 8 and set(df["method"]) == {"imp", "edge_popup"}
    rows, added = row_fields(df, [])
    assert rows == ["method"] == added  # no field splits old from new runs
    ep = df[df["method"] == "edge_popup"]
    assert ep["prune.rate"].isna().all() and ep["supermask.densities"].map(len).eq(2).all()
    assert not df[df["method"] == "imp"].filter(regex=r"^(supermask|at_init)\.").notna().any().any()


# ---------------------------------------------------------------- iterations spent (early-bird's saving)


def test_cost_is_what_each_method_trained_to_get_the_level(tmp_path, capsys):
    """cost_iterations by hand: IMP (T=300, k=10) pays for levels 0..L, T + L (T - k); a
    mask scored at the rewind point pays T; an early-bird record's own value is kept; the
    table (--cost) and the plot (--kind cost) read it from a real store."""
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("cost")
    for seed in (0, 1):
        common = {**BASE, "rewind_iteration": 10, "control": "none", "seed": seed}
        log_trial(c, exp, "s", f"imp-{seed}", {**common, "method": "imp"}, [0.95, 0.94, 0.93])
        log_trial(c, exp, "s", f"snip-{seed}", {**common, "method": "snip"}, [0.95, 0.92, 0.90])
        log_trial(c, exp, "s", f"eb-{seed}", {**common, "method": "early_bird"}, [0.95, 0.93, 0.91],
                  metrics={"cost_iterations": [120 + seed, 410, 420]})
    df = analysis.with_cost(analysis.runs("cost", uri))
    by = {(m, lv): set(rows["cost_iterations"]) for (m, lv), rows in df.groupby(["method", "level"])}
    assert by[("imp", 0)] == {300} and by[("imp", 1)] == {590} and by[("imp", 2)] == {880}
    assert by[("snip", 0)] == by[("snip", 1)] == by[("snip", 2)] == {300}
    assert by[("early_bird", 0)] == {120, 121} and by[("early_bird", 2)] == {420}
    table = analysis.ablation(df, ["method"], cost=True)
    assert table.cell(("early_bird",), "L0")["cost_iterations"] == 120.5
    md = analysis.to_markdown(table)
    assert "[880 it.]" in md and "[120 it.]" in md and "iterations trained to obtain" in md  # 120.5 rounds to even
    assert "cost_iterations" in analysis.to_csv(table).splitlines()[0]
    assert "cost" in analysis.to_latex(table)
    assert main(["report", "table", "--experiment", "cost", "--rows", "method", "--cost", "--tracking-uri", uri]) == 0
    assert "[590 it.]" in capsys.readouterr().out
    out = tmp_path / "cost.png"
    assert main(["report", "plot", "--kind", "cost", "--experiment", "cost", "--rows", "method", "--out", str(out),
                 "--tracking-uri", uri]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = analysis.plots.cost_figure(df, ["method"])
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"imp", "snip", "early_bird"} and not layout_problems(fig)
    assert list(lines["imp"].get_xdata()) == [300, 590, 880]
    assert list(lines["imp"].get_ydata()) == pytest.approx([95, 94, 93])
    # a run without train.iterations has no known cost: left out, and the figure says so
    unknown = analysis.runs("cost", uri).drop(columns=["train.iterations"])
    assert analysis.with_cost(unknown)["cost_iterations"].isna().sum() == 12  # imp's and snip's levels
    fig = analysis.plots.cost_figure(unknown, ["method"])
    assert {l.get_label() for l in fig.axes[0].get_lines()} == {"early_bird"}
    assert fig._suptitle.get_text() == "12 level(s) of unknown cost left out"


def test_imps_derived_cost_is_the_sum_of_what_its_levels_trained(tmp_path):
    """The rule for IMP against a real trial: levels 0..L's recorded `iterations`, summed."""
    import pandas as pd

    from trials.runner.levels import run_lottery
    from trials.spec import flatten, from_dict, to_dict

    spec = from_dict({"model": "lenet_300_100", "dataset": "digits", "device": "cpu", "rewind_iteration": 7,
                      "train": {"batch_size": 60, "iterations": 30, "eval_interval": 10},
                      "prune": {"rate": 0.5, "levels": 2}})
    records = run_lottery(spec, tmp_path / "t")
    params = flatten(to_dict(spec))
    df = pd.DataFrame([{**params, "level": r.level, "test_acc_at_early_stop": r.test_acc} for r in records])
    derived = analysis.with_cost(df)["cost_iterations"]
    assert list(derived) == list(pd.Series([r.iterations for r in records]).cumsum())
