"""Ablation tables: groups of trials by chosen spec fields x density, mean ± std over seeds.

Columns are either the pruning levels (every trial shares the prune rate, so a level is
a density) or target densities, each matched per group to the level whose density is
nearest (within a factor of `DENSITY_TOLERANCE`) and labelled with the density reached.
A cell is the mean ± sample std over the group's trials (seeds) with n; a cell with no
trial is missing, never zero. Marks: the best cell per column, and cells that match the
dense network by the rule in `MATCH_RULE`.

Methods that prune at initialization (snip, grasp, ...) keep IMP's count at every level, so
they share IMP's columns, levels or densities, as rows of their own (`method` joins the rows
whenever runs mix methods), each matched against its own row's dense level 0.

Supermasks (method=edge_popup) have no dense level: their level 0 is their densest
supermask. They are grouped apart from IMP (`method` joins the rows), their columns must
be target densities when methods are mixed, and the dense baseline, which they are
matched against, is the IMP trials' level 0 in the same runs.

Runs that measured instability (spec.stability) add to each cell the mean error barrier
of its trials (`instability`; CSV column, and "inst." in Markdown and LaTeX cells).

With `cost=True` each cell also says what its networks cost to obtain: the mean of
`cost_iterations` (analysis.data.with_cost; CSV column `cost_iterations`, "it." in
Markdown and LaTeX cells), so a cheaper method's accuracy and its saving sit side by side.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from analysis.data import COST, dense_key, row_fields, with_cost
from analysis.plots import has_instability, methods
from trials import methods as registry
from trials.core.errors import ConfigError
from trials.folder.labels import labels

DENSITY_TOLERANCE = 1.25  # a level serves a target density d if its density is within d/1.25 .. d*1.25
MATCH_RULE = ("matches the dense network: its mean is at least the same row's dense (level 0) mean "
              "(a supermask row's: the dense row's) minus the pooled standard deviation over seeds, "
              "√((s² + s_dense²) / 2)")
MATCH_RULE_TEX = (r"matches the dense network: $\bar{x} \geq \bar{x}_{\mathrm{dense}} - "
                  r"\sqrt{(s^2 + s_{\mathrm{dense}}^2)/2}$, with the same row's dense (level 0) mean "
                  r"(a supermask row's: the dense row's) and standard deviations over seeds")


@dataclass
class Table:
    rows: list  # the grouping fields
    columns: list  # column labels, in order
    cells: pd.DataFrame  # one row per (group, column): mean, std, n, level, density, best, matches
    dense: dict  # the dense baseline: mean, std, n over distinct dense networks
    metric: str
    by_level: bool
    order: dict = field(default_factory=dict)  # row field -> its labels in value order
    split: list = field(default_factory=list)  # fields added to the rows because trials differ in them
    read: dict = field(default_factory=dict)  # what was read (orchestrator.tracking.read.select)

    def groups(self) -> list[tuple]:
        """The row groups, sorted by value field by field (numbers as numbers, `none` and
        `imp` first)."""
        groups = {tuple(r) for r in self.cells[self.rows].itertuples(index=False, name=None)}
        rank = {f: {label: i for i, label in enumerate(self.order.get(f, []))} for f in self.rows}
        return sorted(groups, key=lambda g: tuple((rank[f].get(v, len(rank[f])), v) for f, v in zip(self.rows, g)))

    def cell(self, group: tuple, column: str) -> Optional[pd.Series]:
        """The cell of `group` (values compared as text) in `column`, None when there is none."""
        at = self._cell_positions.get((column, tuple(map(str, group))))
        return None if at is None else self.cells.iloc[at]

    @functools.cached_property
    def _cell_positions(self) -> dict:
        """(column, group as text) -> the position of its first cell (looking each cell up in
        the whole frame made a table of 600 rows take minutes)."""
        keys = self.cells[self.rows].astype(str).apply(tuple, axis=1) if len(self.cells) else []
        positions: dict = {}
        for i, (column, key) in enumerate(zip(self.cells["column"], keys)):
            positions.setdefault((column, key), i)
        return positions

    @functools.cached_property
    def shared_densities(self) -> dict:
        """column -> whether all groups reach one density in it, as printed (so the header can
        say it); by level only."""
        if not self.by_level or self.cells.empty:
            return {}
        printed = (100 * self.cells["density"]).round(1)
        return (printed.groupby(self.cells["column"]).nunique() == 1).to_dict()


def ablation(df: pd.DataFrame, rows: list, densities: Optional[list] = None,
             metric: str = "test_acc_at_early_stop", cost: bool = False) -> Table:
    if df.empty:
        raise ConfigError("runs", "empty", "a DataFrame with logged trial levels (analysis.runs of an "
                          "experiment that has run)")
    for name in rows:
        if name not in df:
            known = ", ".join(c for c in df.columns if "." in c or c in ("control", "seed", "rewind_iteration"))
            raise ConfigError("--rows", name, f"a column of the runs; known: {known}")
    if metric not in df:
        raise ConfigError("--metric", metric, "a logged level metric, e.g. test_acc_at_early_stop")
    read = dict(df.attrs.get("read", {}))
    df = with_cost(df) if cost else df.copy()  # before the rows become labels
    df["method"] = methods(df)
    rows, split = row_fields(df, rows)
    order = {}
    for name in rows:
        df[name], order[name] = labels(df[name])
    extra = {"instability": ("stability_error_barrier", "mean")} if has_instability(df) else {}
    if cost:
        extra[COST] = (COST, "mean")
    stats = (df.groupby(rows + ["level"], dropna=False)
             .agg(mean=(metric, "mean"), std=(metric, "std"), n=(metric, "count"), density=("density", "mean"),
                  **extra)
             .reset_index())
    stats["std"] = stats["std"].fillna(0.0)  # n = 1: no spread to report
    if densities is None:
        rates = df["prune.rate"].nunique() if "prune.rate" in df else 1
        if rates > 1 or _supermasks(df).any() and df["method"].nunique() > 1:
            raise ConfigError("--density", None, "these rows use different prune rates, or supermasks beside "
                              "other methods, so a level is not a density; give target densities, e.g. "
                              "--density 1,0.5,0.2,0.1")
        cells = stats.assign(column=stats["level"].map(lambda lv: f"L{lv}"))
        columns = [f"L{lv}" for lv in sorted(stats["level"].unique())]
    else:
        cells, columns = _match_densities(stats, rows, densities)
    dense = _dense(df, metric)
    cells = _mark(cells, stats, rows, dense)
    return Table(rows, columns, cells, dense, metric, densities is None, order, split, read)


def _match_densities(stats: pd.DataFrame, rows: list, densities: list):
    """Per group (in groupby's order) and target density (in the given order): the group's
    level whose density is nearest the target on a log scale (the first of equals), when
    within DENSITY_TOLERANCE. Whole columns at a time: a loop over groups took seconds at
    600 groups."""
    columns = [f"{d:.3g}" for d in densities]
    keys = [stats[r] for r in rows]
    picks = []  # per target: (the best row of each group, its distance)
    for target in densities:
        ratio = (stats["density"] / target).to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            distance = pd.Series(np.where(ratio > 0, np.abs(np.log(ratio)), np.inf), index=stats.index)
        best = distance.groupby(keys, dropna=False).idxmin()
        picks.append((best.to_numpy(), distance[best.to_numpy()].to_numpy()))
    chosen, labels = [], []
    for g in range(len(picks[0][0]) if picks else 0):
        for (best, distance), label in zip(picks, columns):
            if distance[g] <= math.log(DENSITY_TOLERANCE):
                chosen.append(best[g])
                labels.append(label)
    if not chosen:
        return pd.DataFrame([], columns=[*stats.columns, "column"]), columns
    return stats.loc[chosen].assign(column=labels).reset_index(drop=True), columns


def _supermasks(frame: pd.DataFrame) -> pd.Series:
    """Rows of methods with no dense level (supermasks: trials/methods; False where `method`
    is not a row field: IMP only)."""
    return frame["method"].isin(registry.names(dense=False)) if "method" in frame else pd.Series(False, index=frame.index)


def _mark(cells: pd.DataFrame, stats: pd.DataFrame, rows: list, baseline: dict) -> pd.DataFrame:
    """A cell matches its row's dense level; a supermask's, the table's IMP dense baseline."""
    dense = stats[(stats["level"] == 0) & ~_supermasks(stats)].set_index(rows)[["mean", "std"]]
    def matches(c):
        key = tuple(c[r] for r in rows) if len(rows) > 1 else c[rows[0]]
        if c.get("method") in registry.names(dense=False) and baseline["n"]:
            d = baseline
        elif key in dense.index:
            d = dense.loc[key]
        else:
            return False
        return bool(c["mean"] >= d["mean"] - math.sqrt((c["std"] ** 2 + d["std"] ** 2) / 2))

    cells = cells.copy()
    cells["matches"] = cells.apply(matches, axis=1) if not cells.empty else []
    cells["best"] = cells.groupby("column")["mean"].transform("max").eq(cells["mean"]) if not cells.empty else []
    return cells


def _dense(df: pd.DataFrame, metric: str) -> dict:
    level0 = df[(df["level"] == 0) & ~_supermasks(df)]  # a supermask is never dense
    level0 = level0[~dense_key(level0).duplicated()]  # each distinct dense network once
    values = level0[metric].astype(float)
    return {"mean": values.mean(), "std": values.std() if len(values) > 1 else 0.0, "n": len(values)}


# ---------------------------------------------------------------- rendering


def _fmt(mean, std, n, percent=True) -> str:
    scale = 100 if percent else 1
    if n == 1:  # one trial: no spread to report (not ± 0)
        return f"{mean * scale:.2f} (n=1)"
    return f"{mean * scale:.2f} ± {std * scale:.2f} (n={n})"


def _cell_text(table: Table, c) -> str:
    text = _fmt(c["mean"], c["std"], int(c["n"]))
    text = text if table.shared_densities.get(c["column"], False) else f"{text} @{100 * c['density']:.1f}%"
    inst = c.get("instability")
    text = text if inst is None or inst != inst else f"{text} inst. {100 * inst:.2f}%"
    spent = c.get(COST)
    return text if spent is None or spent != spent else f"{text} [{spent:.0f} it.]"


def _markdown_cell(table: Table, c) -> str:
    if c is None:
        return "—"
    text = _cell_text(table, c)
    return (f"**{text}**" if c["best"] else text) + (" ‡" if c["matches"] else "")


def _latex_cell(table: Table, c) -> str:
    if c is None:
        return "---"
    text = _tex(_cell_text(table, c))
    return (rf"\textbf{{{text}}}" if c["best"] else text) + (r"$^\dagger$" if c["matches"] else "")


def _header(table: Table, col: str) -> str:
    if table.shared_densities.get(col, False):
        return f"{col} ({100 * table.cells.loc[table.cells['column'] == col, 'density'].mean():.1f}%)"
    return col if table.by_level else f"≈{100 * float(col):.3g}%"


def _dense_row(table: Table, fmt) -> list:
    """The dense baseline under the column that holds level 0 (else the first)."""
    cells = table.cells
    level0 = cells.loc[(cells["level"] == 0) & ~_supermasks(cells), "column"]
    at = table.columns.index(level0.iloc[0]) if not level0.empty else 0
    d = table.dense
    text = fmt(_fmt(d["mean"], d["std"], d["n"]) if d["n"] else "—")  # no IMP trial: no dense network
    return [text if i == at else "" for i in range(len(table.columns))]


def _title(table: Table) -> str:
    what = "level (weights remaining)" if table.by_level else "target density (density reached per cell)"
    return f"{table.metric} in %, mean ± std over the trials (seeds) of each row, by {what}"


def provenance(table: Table) -> list:
    """What the table read, and the fields that split its rows (one line each)."""
    from orchestrator.tracking.read import describe

    lines = [describe(table.read)] if table.read else []
    if table.split:
        lines.append(f"rows split by {', '.join(table.split)}: the trials differ in "
                     f"{'it' if len(table.split) == 1 else 'them'} (a row pools seeds, never configurations)")
    return lines


def to_markdown(table: Table) -> str:
    head = [*table.rows, *(_header(table, c) for c in table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| " + " | ".join(["dense"] + [""] * (len(table.rows) - 1) + _dense_row(table, str)) + " |")
    for group in table.groups():
        texts = [_markdown_cell(table, table.cell(group, col)) for col in table.columns]
        lines.append("| " + " | ".join([*group, *texts]) + " |")
    return "\n".join([_title(table), *provenance(table), "", *lines, "", f"**bold**: best in its column; @: density reached; "
                                                     f"{_INST if 'instability' in table.cells else ''}"
                                                     f"{_COST if COST in table.cells else ''}"
                                                     f"‡ {MATCH_RULE}."])


_INST_TEX = "inst.: mean instability (test-error barrier between two copies). "
_INST = "inst.: mean instability (test-error barrier between two copies, Frankle et al. 2020); "
_COST = "[n it.]: iterations trained to obtain the cell's networks, mean (cost_iterations); "


def _tex(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
            .replace("&", r"\&").replace("#", r"\#").replace("±", r"$\pm$").replace("≈", r"$\approx$")
            .replace("—", "---"))


def to_latex(table: Table) -> str:
    ncol = len(table.rows) + len(table.columns)
    lines = [f"% {_title(table)}; generated by lth (analysis.tables)", *(f"% {p}" for p in provenance(table)),
             r"\begin{tabular}{" + "l" * len(table.rows) + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(_tex(h) for h in [*table.rows, *(_header(table, c) for c in table.columns)]) + r" \\",
             r"\midrule"]
    lines.append(" & ".join(["dense"] + [""] * (len(table.rows) - 1) + _dense_row(table, _tex)) + r" \\")
    lines.append(r"\midrule")
    for group in table.groups():
        texts = [_latex_cell(table, table.cell(group, col)) for col in table.columns]
        lines.append(" & ".join([*(_tex(g) for g in group), *texts]) + r" \\")
    lines += [r"\bottomrule",
              rf"\multicolumn{{{ncol}}}{{l}}{{\footnotesize Bold: best in its column; @: density reached. {_INST_TEX if 'instability' in table.cells else ''}{_tex(_COST) if COST in table.cells else ''}$^\dagger$ {MATCH_RULE_TEX}.}} \\",
              r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    cols = [*table.rows, "column", "level", "density", "mean", "std", "n", "best", "matches"]
    cols += ["instability"] if "instability" in table.cells else []
    cols += [COST] if COST in table.cells else []
    return table.cells[cols].to_csv(index=False)
