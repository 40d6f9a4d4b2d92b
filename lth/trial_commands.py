"""`lth trial ...`: one IMP run in this process, with its console output."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from lth.console import Progress, records_table
from trials import methods
from trials.core.errors import ConfigError


def add(commands) -> None:
    trial = commands.add_parser("trial", help="one IMP run, in this process").add_subparsers(title="trial")

    run = trial.add_parser("run", help="run or resume one trial")
    run.add_argument("config", nargs="?", help="trial config YAML (may start with `preset: NAME`)")
    run.add_argument("--preset", help="a shipped paper preset (see `lth trial presets`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any spec key by its path, e.g. --set prune.rate=0.3")
    run.add_argument("--out", help="trial folder (default: runs/trials/KEY)")
    run.set_defaults(func=trial_run)

    show = trial.add_parser("show", help="print the resolved spec and its key")
    show.add_argument("config", nargs="?", help="trial config YAML (may start with `preset: NAME`)")
    show.add_argument("--preset", help="a shipped paper preset (see `lth trial presets`)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override any spec key by its path, e.g. --set prune.rate=0.3")
    show.set_defaults(func=trial_show)

    trial.add_parser("presets", help="list the shipped presets").set_defaults(func=trial_presets)


def _spec(args):
    from orchestrator.config import trial_spec

    if not args.config and not args.preset:
        raise ConfigError("config", None, "give a config file or --preset NAME")
    return trial_spec(args.config, args.preset, args.overrides)


def trial_show(args) -> int:
    import yaml

    spec = _spec(args)
    print(f"# key: {spec.key}")
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    return 0


def trial_presets(args) -> int:
    from orchestrator.config import PRESETS_DIR, preset_names

    names = preset_names()
    rows = []
    for name in names:  # the file's opening comment, to its first full stop
        comment = []
        for line in (PRESETS_DIR / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        text = " ".join(comment)
        first = re.split(r"(?<!\bal)\.(\s|$)", text)[0]  # "Frankle et al. 2020" is not a sentence's end
        rows.append((name, first + "." if first else ""))
    print(presets_text(rows, shutil.get_terminal_size().columns))
    return 0


def presets_text(rows: list, width: int) -> str:
    """Each preset's name and description, wrapped to `width` (80 where no terminal says):
    the description beside the names where that leaves it 40 columns, else under its name."""
    import textwrap

    column = max(len(name) for name, _ in rows) + 2
    beside = width - column >= 40
    out = []
    for name, text in rows:
        if beside:
            lines = textwrap.wrap(text, width - column) or [""]
            out += [f"{name:<{column}}{lines[0]}".rstrip()] + [" " * column + ln for ln in lines[1:]]
        else:
            out += [name] + textwrap.wrap(text, max(20, width), initial_indent="    ", subsequent_indent="    ")
    return "\n".join(out)


def levels_text(spec) -> str:
    """What the trial trains, counted as its records count (level 0 is a level): "3 levels
    (dense, 2 pruned) x 400 iterations", or with a rewind point k, "..., 400 iterations
    dense, 370 pruned"."""
    n, t = spec.last_level + 1, spec.train.iterations
    if not methods.of(spec).rewinds:
        return f"{n} level{'s' * (n != 1)} (one per density) x {t} iterations"
    pruned = f"dense, {spec.last_level} pruned" if spec.last_level else "dense only"
    k = spec.rewind_iteration
    return f"{n} level{'s' * (n != 1)} ({pruned}) x " + (
        f"{t} iterations" if not k or not spec.last_level else f"{t} iterations dense, {t - k} pruned")


def trial_run(args) -> int:
    from trials.runner.levels import prepare, run_lottery

    spec = _spec(args)
    out = Path(args.out or Path("runs") / "trials" / spec.key)
    data, _ = prepare(spec, out)  # every input error surfaces here, before any write
    print(f"trial {spec.key}: {spec.model.name} on {spec.dataset.name}, {levels_text(spec)} -> {out}",
          file=sys.stderr)
    progress = Progress(spec.last_level)
    records = run_lottery(spec, out, report=progress.level_done, progress=progress.step, data=data)
    print(records_table(records))
    return 0
