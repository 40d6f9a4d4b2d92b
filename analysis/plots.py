"""IMP curves as in Frankle & Carbin: a metric against percent of weights remaining (log x,
dense on the left), one line per group, shaded ± std over seeds, controls dashed.
Supermasks (method=edge_popup) share the axes: each method is its own group, drawn with
its own marker (IMP tickets circles, supermasks squares) and colour."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from trials.errors import ConfigError

MARKERS = {"imp": "o", "edge_popup": "s"}  # matplotlib markers by method
PANELS = (("test_acc_at_early_stop", "test accuracy at early stop (%)", 100),
          ("early_stop_iteration", "early-stop iteration", 1))


def imp_curves(df: pd.DataFrame, rows: list, out, panels=PANELS):
    """Write the figure to `out` (.png or .pdf); returns the path."""
    # a Figure of its own (no pyplot): the caller's backend, e.g. a notebook's inline one, stays
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out = Path(out)
    if out.suffix not in (".png", ".pdf"):
        raise ConfigError("--out", str(out), "a .png or .pdf file")
    for field in rows:
        if field not in df:
            raise ConfigError("--rows", field, "a column of the runs (spec path such as prune.kind)")
    df = df.copy()
    df["method"] = methods(df)
    if "method" not in rows and df["method"].nunique() > 1:  # a line never mixes methods
        rows = [*rows, "method"]
    df["_group"] = df[rows].astype(str).agg(", ".join, axis=1) if rows else "all"
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], panels):
        for name, group in df.groupby("_group", sort=True):
            s = group.groupby("level").agg(x=("density", "mean"), m=(metric, "mean"), sd=(metric, "std"))
            x, m, sd = 100 * s["x"], scale * s["m"].astype(float), scale * s["sd"].fillna(0).astype(float)
            control = "control" in group and (group["control"].astype(str) != "none").any()
            line, = ax.plot(x, m, marker=MARKERS.get(group["method"].iloc[0], "o"), ms=3,
                            ls="--" if control else "-", label=name)
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xscale("log")
        ticks = _ticks(100 * df.groupby(["method", "level"])["density"].mean())
        ax.set_xticks(ticks[:: max(1, len(ticks) // 10)])  # the levels' densities, at most ~10 labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()  # dense (100%) on the left, sparser to the right
        ax.set_xlabel("percent of weights remaining")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(title=", ".join(rows) or None, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _ticks(percents: pd.Series) -> list:
    """The levels' densities (%), descending, leaving out one within 5% of a larger one
    (IMP's 70.2% beside a supermask's 70%): their labels would overlap."""
    kept: list = []
    for p in sorted(set(percents.round(1)), reverse=True):
        if not kept or p < 0.95 * kept[-1]:
            kept.append(p)
    return kept


def methods(df: pd.DataFrame) -> pd.Series:
    """Each row's trial method; runs logged before there was a choice are IMP."""
    if "method" not in df:
        return pd.Series("imp", index=df.index, dtype="string")
    return df["method"].astype("string").fillna("imp")
