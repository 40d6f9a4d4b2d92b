"""IMP curves as in Frankle & Carbin: a metric against percent of weights remaining (log x,
dense on the left), one line per group, shaded ± std over seeds, controls dashed.
Supermasks (method=edge_popup) share the axes: each method is its own group, drawn with
its own marker (IMP tickets circles, supermasks squares) and colour.

Instability as in Frankle et al. 2020 (`instability_curves`): the error barrier against
the rewind iteration k, one line per group and level, the 2% "stable" threshold dashed."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from trials.errors import ConfigError

MARKERS = {"imp": "o", "edge_popup": "s", "snip": "^", "grasp": "v", "synflow": "D", "magnitude_init": "P",
           "random_init": "x"}  # matplotlib markers by method
PANELS = (("test_acc_at_early_stop", "test accuracy at early stop (%)", 100),
          ("early_stop_iteration", "early-stop iteration", 1))


def imp_curves(df: pd.DataFrame, rows: list, out, panels=PANELS):
    """Write the figure to `out` (.png or .pdf); returns the path."""
    # a Figure of its own (no pyplot): the caller's backend, e.g. a notebook's inline one, stays
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out = _checked(out, df, rows)
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
            _band(ax, x, m, sd, marker=MARKERS.get(group["method"].iloc[0], "o"),
                  ls="--" if control else "-", label=name)
        ax.set_xscale("log")
        ticks = _ticks(100 * df.groupby(["method", "level"])["density"].mean())
        ax.set_xticks(ticks[:: max(1, len(ticks) // 10)])  # the levels' densities, at most ~10 labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()  # dense (100%) on the left, sparser to the right
        ax.set_xlabel("percent of weights remaining")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, axes, rows, out)


def _checked(out, df: pd.DataFrame, rows: list) -> Path:
    """`out` as a Path, refused unless .png/.pdf; every row field must be a column."""
    out = Path(out)
    if out.suffix not in (".png", ".pdf"):
        raise ConfigError("--out", str(out), "a .png or .pdf file")
    for field in rows:
        if field not in df:
            raise ConfigError("--rows", field, "a column of the runs (spec path such as prune.kind)")
    return out


def _band(ax, x, m, sd, **style) -> None:
    """A mean line with its ± std band in the line's colour."""
    line, = ax.plot(x, m, ms=3, **style)
    ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.2, lw=0)


def _save(fig, axes, rows: list, out: Path) -> Path:
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


STABLE = 0.02  # Frankle et al. 2020: a network is stable when its error barrier is below 2%
STABILITY_PANELS = (("stability_error_barrier", "instability: test-error barrier (%)", 100),
                    ("stability_loss_barrier", "test-loss barrier (nats)", 1))


def has_instability(df: pd.DataFrame) -> bool:
    """Whether any level of these runs measured instability (spec.stability)."""
    return "stability_error_barrier" in df and df["stability_error_barrier"].notna().any()


def instability_curves(df: pd.DataFrame, rows: list, out, panels=STABILITY_PANELS):
    """Instability against the rewind iteration (symmetric-log x, so k = 0 shows): one line
    per group of `rows` (rewind_iteration is the x axis, not a row) and measured level,
    labelled with the level's mean density, shaded ± std over seeds. Writes `out` (.png or
    .pdf); returns the path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r != "rewind_iteration"]
    out = _checked(out, df, rows + ["rewind_iteration"])
    if not has_instability(df):
        raise ConfigError("--kind", "instability", "runs that measured instability (trials with "
                          "stability.copies >= 2); these runs have none")
    df = df[df["stability_error_barrier"].notna()].copy()
    df["_group"] = df[rows].astype(str).agg(", ".join, axis=1) if rows else ""
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], panels):
        for (name, level), group in df.groupby(["_group", "level"], sort=True):
            s = group.groupby("rewind_iteration").agg(m=(metric, "mean"), sd=(metric, "std"))
            x, m, sd = s.index.astype(float), scale * s["m"].astype(float), scale * s["sd"].fillna(0).astype(float)
            density = 100 * float(group["density"].mean())
            text = f"level {level} ({density:.3g}%)" + (f", {name}" if name else "")
            _band(ax, x, m, sd, marker="o", label=text)
        if metric == "stability_error_barrier":
            ax.axhline(100 * STABLE, color="grey", ls="--", lw=1, label="stable below 2%")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.5, 1.6 * max(1.0, float(df["rewind_iteration"].max())))  # k >= 0 only
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("rewind iteration k")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, axes, rows, out)
