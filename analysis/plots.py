"""IMP curves as in Frankle & Carbin: a metric against percent of weights remaining (log x,
dense on the left), one line per row group (analysis.data.row_fields), shaded ± std over
seeds. Colour encodes one row field, line style and marker the others; many lines facet
by the first field (a method) so a panel holds its controls. Legends sit in the figure,
outside the axes; a panel with nothing to say says so (imp_figure).

Instability as in Frankle et al. 2020 (`instability_curves`): the error barrier against
the rewind iteration k, one line per group and level, the 2% "stable" threshold dashed.

Cost (`cost_curves`): accuracy against the iterations trained to obtain each level's
network (analysis.data.with_cost), one line per group through its levels, each point
labelled with its density: what a cheaper way to a ticket (early-bird) saves and what it
costs in accuracy, side by side."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.data import method_names as methods
from trials.core.errors import ConfigError

PANELS = (("test_acc_at_early_stop", "test accuracy at early stop (%)", 100),
          ("early_stop_iteration", "early-stop iteration", 1))
FORMATS = (".png", ".pdf", ".svg")  # PNG for screens, PDF and SVG for papers
HANDFUL = 6  # more lines than this, and two or more row fields: one panel per value of the first
# (line style, marker) pairs: with colour, no two lines of a panel look alike
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (3, 1, 1, 1)), "P"),
          ((0, (1, 1)), "X"), ((0, (5, 5)), "*"))
NICE = tuple(sorted({round(m * 10.0 ** e, 3) for e in range(-2, 3) for m in (1, 2, 3, 4, 5, 6, 8)
                     if m * 10.0 ** e <= 100}, reverse=True))  # x ticks (%) where rows reach different densities


def checked_out(out) -> Path:
    """`out` as a Path, refused unless its suffix is one of FORMATS."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError("--out", str(out), f"a file ending in {', '.join(FORMATS)} (PNG for screens, PDF or SVG "
                          "for papers)")
    return out


def imp_curves(df: pd.DataFrame, rows: list, out, panels=PANELS):
    """Write the figure to `out` (.png, .pdf or .svg); returns the path."""
    out = _checked(out, df, rows)
    return _save(imp_figure(df, rows, panels), out)


def imp_figure(df: pd.DataFrame, rows: list, panels=PANELS):
    """The IMP figure (a matplotlib Figure of its own, no pyplot: the caller's backend, e.g.
    a notebook's inline one, stays). Lines are the row groups (analysis.data.row_fields:
    method and control join the rows when they vary, and any field in which a row's trials
    differ), each at its own mean density per level. Colour encodes the first varying row
    field, line style and marker the others; beyond HANDFUL lines with two or more fields,
    one panel per value of the first field (a method), lines for the rest (its controls),
    encoded alike in every panel. The legend sits outside the axes, in the figure. A metric
    with no information (every early stop at the last iteration) is left out, and the
    figure says so."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    _check_rows(df, rows)
    df, rows, order = _grouped(df, rows)
    varying = [f for f in rows if df[f].nunique() > 1]
    notes = []
    kept = []
    for metric, label, scale in panels:
        empty = _uninformative(df, metric)
        if empty:
            notes.append(f"{label} not drawn: {empty}")
        else:
            kept.append((metric, label, scale))
    if not kept:
        kept, notes = list(panels[:1]), notes[1:]
    groups = _sorted_groups(df, varying, order)
    facet = varying[0] if len(groups) > HANDFUL and len(varying) >= 2 else None
    lines = varying[1:] if facet else varying
    colour_by, style_by = (lines, lines) if facet else (lines[:1], lines[1:])
    colours = _palette([tuple(g[varying.index(f)] for f in colour_by) for g in groups])
    styles = _styles([tuple(g[varying.index(f)] for f in style_by) for g in groups])
    facets = list(dict.fromkeys(g[0] for g in groups)) if facet else [None]
    ncol = min(3, len(facets)) if facet else len(kept)
    nrow = -(-len(facets) // ncol) * (len(kept) if facet else 1)
    legend_entries = len({tuple(g[varying.index(f)] for f in lines) for g in groups}) if varying else 1
    fig, axes = _figure(nrow, ncol, legend_entries)
    shared = _shared_densities(df, varying)
    lo, hi = float(df["density"].min()), float(df["density"].max())
    for p, (metric, label, scale) in enumerate(kept):
        block = [axes[p * (nrow // len(kept)) + i // ncol][i % ncol] for i in range(len(facets))] if facet else \
            [axes[0][p]]
        for ax in block[1:]:  # before drawing, so that the limits hold every panel's data
            ax.sharey(block[0])
        for f, ax in zip(facets, block):
            empty = _uninformative(df[df[facet] == f], metric) if facet else ""
            if empty:  # this panel alone says nothing: it says so instead of a flat line
                ax.text(0.5, 0.5, f"{f}: {empty}", transform=ax.transAxes, ha="center", va="center", fontsize=7,
                        wrap=True)
            for g in groups:
                if (facet and g[0] != f) or empty:
                    continue
                part = df[(df[varying].astype(str) == list(g)).all(axis=1)] if varying else df
                s = part.groupby("level").agg(x=("density", "mean"), m=(metric, "mean"), sd=(metric, "std"))
                x, m, sd = 100 * s["x"], scale * s["m"].astype(float), scale * s["sd"].fillna(0).astype(float)
                key_c = tuple(g[varying.index(c)] for c in colour_by)
                key_s = tuple(g[varying.index(c)] for c in style_by)
                ls, marker = styles[key_s]
                _band(ax, x, m, sd, color=colours[key_c], ls=ls, marker=marker, label=", ".join(
                    g[varying.index(c)] for c in lines) or "all")
            ax.set_xscale("log")
            ticks = shared or _nice(100 * df["density"].min())
            ax.set_xticks(ticks[:: max(1, -(-len(ticks) // 8))])  # at most 8 labels
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(100 * hi * 1.12, 100 * lo / 1.12)  # dense on the left, sparser to the right; every panel alike
            ax.set_xlabel("weights remaining (%)" if shared else "weights remaining (%), each line at its trials' mean per level",
                          fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if facet:
                ax.set_title(f"{facet} = {f}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    for ax in [a for row in axes for a in row][len(facets) * len(kept) if facet else len(kept):]:
        ax.set_visible(False)
    _legend(fig, [a for row in axes for a in row][0], "\n".join(
        t for t in (", ".join(lines), "(line: mean over seeds,\nband: ± std)") if t))
    if notes:
        fig.suptitle("; ".join(notes), fontsize=8)
    return fig


def _grouped(df: pd.DataFrame, rows: list, axis=()):
    """The runs with `method` set and every row field as labels (trials/folder/labels.py); the
    rows after analysis.data.row_fields; each field's labels in value order."""
    from analysis.data import row_fields
    from trials.folder.labels import labels

    df = df.copy()
    df["method"] = methods(df)
    rows, _ = row_fields(df, rows, axis)
    order = {}
    for name in rows:
        df[name], order[name] = labels(df[name])
    return df, rows, order


def _sorted_groups(df: pd.DataFrame, fields: list, order: dict) -> list:
    if not fields:
        return [()]
    groups = {tuple(r) for r in df[fields].itertuples(index=False, name=None)}
    return sorted(groups, key=lambda g: tuple(order[f].index(v) for f, v in zip(fields, g)))


def _uninformative(df: pd.DataFrame, metric: str) -> str:
    """Why `metric` carries no information in these runs ('' when it does)."""
    values = df[metric].dropna() if metric in df else pd.Series(dtype=float)
    if values.empty:
        return "not logged"
    if metric == "early_stop_iteration" and "train.iterations" in df:
        last = pd.to_numeric(df.loc[values.index, "train.iterations"], errors="coerce")
        if (values.astype(float) >= last.astype(float)).all():
            return "every early stop at the last iteration"
    if values.nunique() == 1:
        return f"{values.iloc[0]:g} at every level"
    return ""


def _palette(keys: list) -> dict:
    """key -> a colour, distinct for distinct keys (tab10, tab20, else evenly from viridis)."""
    from matplotlib import colormaps

    distinct = list(dict.fromkeys(keys))
    if len(distinct) <= 10:
        colours = colormaps["tab10"].colors
    elif len(distinct) <= 20:
        colours = colormaps["tab20"].colors
    else:
        colours = [colormaps["viridis"](i / (len(distinct) - 1)) for i in range(len(distinct))]
    return {k: colours[i] for i, k in enumerate(distinct)}


def _styles(keys: list) -> dict:
    """style key -> (line style, marker), in order of first appearance: one style means one
    value in every colour and panel."""
    return {k: STYLES[i % len(STYLES)] for i, k in enumerate(dict.fromkeys(keys))}


def _figure(nrow: int, ncol: int, legend_entries: int):
    """A constrained-layout figure of nrow x ncol panels, tall enough for the legend."""
    from matplotlib.figure import Figure

    height = max(3.2 * nrow, 0.75 + 0.19 * min(legend_entries, 20)) if legend_entries > 0 else 3.2 * nrow
    fig = Figure(figsize=(3.9 * ncol + 2.2, height), layout="constrained")
    return fig, fig.subplots(nrow, ncol, squeeze=False)


def _legend(fig, ax, title) -> None:
    """One legend for the figure, outside the axes on the right (constrained layout keeps
    it inside the figure): never over data, never off the edge."""
    handles, names = ax.get_legend_handles_labels()
    if len(handles) > 1 or title:
        fig.legend(handles, names, loc="outside right upper", title=title, fontsize=7, title_fontsize=8,
                   ncols=1 if len(handles) <= 20 else 2, frameon=False)


def _shared_densities(df: pd.DataFrame, fields: list) -> list:
    """The levels' densities (%) when every line reached the same ones (as printed, to
    0.1%), else [] (each line is drawn at its own)."""
    per = df.groupby([*fields, "level"] if fields else ["level"])["density"].mean().reset_index()
    per["density"] = (100 * per["density"]).round(1) / 100
    spread = per.groupby("level")["density"].agg(["min", "max"])
    if (spread["max"] != spread["min"]).any():
        return []
    return _ticks(100 * spread["max"])


def _check_rows(df: pd.DataFrame, rows: list) -> None:
    for name in rows:
        if name not in df:
            raise ConfigError("--rows", name, "a column of the runs (spec path such as prune.kind)")


def _checked(out, df: pd.DataFrame, rows: list) -> Path:
    """`out` as a Path, refused unless .png/.pdf/.svg; every row field must be a column."""
    out = checked_out(out)
    _check_rows(df, rows)
    return out


def _band(ax, x, m, sd, **style) -> None:
    """A mean line with its ± std band in the line's colour."""
    line, = ax.plot(x, m, ms=4, lw=1.3, **style)
    ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, format=out.suffix.lower()[1:])
    return out


def _nice(low: float) -> list:
    """Round x ticks (%) from 100 down to `low`: 1-2-5 steps over decades, finer within one."""
    ticks = [t for t in NICE if low * 0.95 <= t]
    coarse = [t for t in ticks if str(t).lstrip("0.")[:1] in "125"]
    return coarse if len(coarse) >= 4 else ticks


def _ticks(percents: pd.Series) -> list:
    """The levels' densities (%), descending, leaving out one within 5% of a larger one:
    their labels would overlap."""
    kept: list = []
    for p in sorted(set(percents.round(1)), reverse=True):
        if not kept or p < 0.95 * kept[-1]:
            kept.append(p)
    return kept


STABLE = 0.02  # Frankle et al. 2020: a network is stable when its error barrier is below 2%
STABILITY_PANELS = (("stability_error_barrier", "instability: test-error barrier (%)", 100),
                    ("stability_loss_barrier", "test-loss barrier (nats)", 1))


def has_instability(df: pd.DataFrame) -> bool:
    """Whether any level of these runs measured instability (spec.stability)."""
    return "stability_error_barrier" in df and df["stability_error_barrier"].notna().any()


def instability_curves(df: pd.DataFrame, rows: list, out, panels=STABILITY_PANELS):
    """Write `instability_figure` to `out` (.png, .pdf or .svg); returns the path."""
    rows = [r for r in rows if r != "rewind_iteration"]
    out = _checked(out, df, rows + ["rewind_iteration"])
    return _save(instability_figure(df, rows, panels), out)


def instability_figure(df: pd.DataFrame, rows: list, panels=STABILITY_PANELS):
    """Instability against the rewind iteration (symmetric-log x, so k = 0 shows): one line
    per group of `rows` (rewind_iteration is the x axis, not a row; fields join the rows
    as in imp_figure) and measured level, shaded ± std over seeds. Colour encodes the
    group, line style and marker the level (labelled with its mean density)."""
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r != "rewind_iteration"]
    _check_rows(df, rows + ["rewind_iteration"])
    if not has_instability(df):
        raise ConfigError("--kind", "instability", "runs that measured instability (trials with "
                          "stability.copies >= 2); these runs have none")
    df, rows, order = _grouped(df[df["stability_error_barrier"].notna()], rows, axis=("rewind_iteration",))
    varying = [f for f in rows if df[f].nunique() > 1]
    groups = _sorted_groups(df, varying, order)
    levels = sorted(df["level"].dropna().unique())
    colours = _palette(groups)
    styles = _styles(levels)
    fig, axes = _figure(1, len(panels), len(groups) * len(levels) + 1)
    for ax, (metric, label, scale) in zip(axes[0], panels):
        for g in groups:
            part = df[(df[varying].astype(str) == list(g)).all(axis=1)] if varying else df
            for level, group in part.groupby("level", sort=True):
                s = group.groupby("rewind_iteration").agg(m=(metric, "mean"), sd=(metric, "std"))
                x, m, sd = s.index.astype(float), scale * s["m"].astype(float), scale * s["sd"].fillna(0).astype(float)
                density = 100 * float(group["density"].mean())
                text = f"level {level} ({density:.3g}%)" + (f", {', '.join(g)}" if g else "")
                ls, marker = styles[level]
                _band(ax, x, m, sd, color=colours[g], ls=ls, marker=marker, label=text)
        if metric == "stability_error_barrier":
            ax.axhline(100 * STABLE, color="grey", ls=(0, (2, 2)), lw=1, label="stable below 2%")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.5, 1.6 * max(1.0, float(df["rewind_iteration"].max())))  # k >= 0 only
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("rewind iteration k", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    _legend(fig, axes[0][0], ", ".join(["level", *varying]))
    return fig


COST_PANEL = ("test_acc_at_early_stop", "test accuracy at early stop (%)", 100)


def cost_curves(df: pd.DataFrame, rows: list, out, panel=COST_PANEL):
    """Write `cost_figure` to `out` (.png, .pdf or .svg); returns the path."""
    out = _checked(out, df, rows)
    return _save(cost_figure(df, rows, panel), out)


def cost_figure(df: pd.DataFrame, rows: list, panel=COST_PANEL):
    """A metric against the iterations spent to obtain each level's network (x:
    cost_iterations, mean over seeds; y: the metric, shaded ± std): one line per group of
    `rows` (fields join the rows as in imp_figure) through its levels in order, each point
    labelled with its mean density. A row whose cost is unknown (analysis.data.with_cost)
    is left out, and the figure says how many."""
    from analysis.data import COST, with_cost

    _check_rows(df, rows)
    metric, label, scale = panel
    if metric not in df:
        raise ConfigError("--metric", metric, "a logged level metric, e.g. test_acc_at_early_stop")
    df = with_cost(df)
    unknown = int(df[COST].isna().sum())
    df, rows, order = _grouped(df[df[COST].notna()], rows)
    if df.empty:
        raise ConfigError("--kind", "cost", "runs whose iterations spent are known (a registered method with "
                          "train.iterations logged)")
    varying = [f for f in rows if df[f].nunique() > 1]
    groups = _sorted_groups(df, varying, order)
    colours = _palette([g[:1] for g in groups])
    styles = _styles([g[1:] for g in groups])
    fig, axes = _figure(1, 1, len(groups))
    ax = axes[0][0]
    annotate = len(groups) <= HANDFUL
    labelled = set()  # points already labelled (lines that share a point, e.g. one dense network)
    for g in groups:
        part = df[(df[varying].astype(str) == list(g)).all(axis=1)] if varying else df
        s = part.groupby("level").agg(x=(COST, "mean"), m=(metric, "mean"), sd=(metric, "std"), d=("density", "mean"))
        m, sd = scale * s["m"].astype(float), scale * s["sd"].fillna(0).astype(float)
        ls, marker = styles[g[1:]]
        _band(ax, s["x"].astype(float), m, sd, color=colours[g[:1]], ls=ls, marker=marker,
              label=", ".join(g) or ", ".join(str(part[r].iloc[0]) for r in rows) or "all")
        for x, y, d in zip(s["x"], m, s["d"]) if annotate else ():
            if (round(x, 6), round(y, 6)) in labelled:
                continue
            labelled.add((round(x, 6), round(y, 6)))
            ax.annotate(f"{100 * d:.3g}%", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("iterations trained to obtain the network (cost_iterations)", fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    _legend(fig, ax, "\n".join(t for t in (", ".join(varying), "(line: levels in order, mean over seeds,\n"
                                                                 "band: ± std" + (";\npoint labels: weights remaining)"
                                                                                  if annotate else ")")) if t))
    if unknown:
        fig.suptitle(f"{unknown} level(s) of unknown cost left out", fontsize=8)
    return fig
