"""Row labels for tables and figures: values sorted by value (numbers as numbers, `none`
and `imp` first), floats from a search shown at a readable precision."""
from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

FIRST = ("none", "imp")  # no control; IMP among methods


def value_key(value):
    """Sort key of one row value: `none`/`imp` first, numbers as numbers, then text."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return (0, 0, "")
    if isinstance(value, str):
        if value in FIRST:
            return (1, FIRST.index(value), "")
        return (3, 0, value)
    if isinstance(value, (bool, np.bool_)):
        return (3, 0, str(value))
    if isinstance(value, numbers.Real):
        return (2, float(value), "")
    return (3, 0, str(value))


def short(value) -> str:
    """One value in a line a person reads (the live line): a float that is not whole at 4
    significant digits (a search's draw; trials.csv and MLflow keep it whole)."""
    if isinstance(value, float) and value == value and not value.is_integer():
        return f"{value:.4g}"
    return str(value)


def labels(values: pd.Series) -> tuple[pd.Series, list]:
    """A row field's values as labels, and the labels in value order. Floats (a search's
    draws) at 4 significant digits, more only where two values would read the same."""
    values = values.astype(object).where(values.notna(), None)
    distinct = sorted(set(values), key=value_key)
    floats = [v for v in distinct if isinstance(v, float) and not float(v).is_integer()]  # np.float64 too
    digits = 4
    while digits < 17 and len({f"{v:.{digits}g}" for v in floats}) < len(floats):
        digits += 1

    def label(v) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "()"
        return str(v)
    names = {v: label(v) for v in distinct}
    return values.map(names).astype(str), list(dict.fromkeys(names[v] for v in distinct))
