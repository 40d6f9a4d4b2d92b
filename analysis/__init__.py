"""MLflow -> pandas -> ablation tables and IMP plots for papers.

    df = analysis.runs("lenet-mnist", sweeps=["lenet-ablation"])  # one row per trial x level
    t = analysis.ablation(df, ["prune.kind", "rewind_iteration"], densities=[1, 0.2, 0.05])
    print(analysis.to_markdown(t)); open("table.tex", "w").write(analysis.to_latex(t))
    analysis.imp_curves(df, ["prune.kind", "control"], "imp.pdf")
    analysis.instability_curves(df, ["retrain"], "instability.pdf")   # vs rewind iteration k
    analysis.cost_curves(df, ["method"], "cost.pdf")   # accuracy vs iterations spent per level
"""
from analysis import plots
from analysis.data import runs, with_cost, with_density
from analysis.plots import cost_curves, imp_curves, instability_curves
from analysis.tables import MATCH_RULE, Table, ablation, provenance, to_csv, to_latex, to_markdown

__all__ = ["runs", "with_density", "with_cost", "cost_curves", "ablation", "provenance", "to_markdown", "to_latex", "to_csv", "imp_curves",
           "instability_curves", "plots", "Table", "MATCH_RULE"]
