"""`lth tickets compact`: a ticket as a smaller dense network for inference (trials/export/compact/),
from an exported ticket folder or from an MLflow run (whose run then holds the result too)."""
from __future__ import annotations

import sys
from pathlib import Path

from trials.folder import layout
from trials.core.errors import ConfigError, check

TICKET_FILES = (layout.SPEC, layout.RECORD, layout.MASK, layout.FINAL)


def add(tickets) -> None:
    cmd = tickets.add_parser(
        "compact", help="cut a ticket's removed units out: a smaller dense network (safetensors + JSON, "
        "TorchScript, ONNX), checked against the masked network on the test set")
    cmd.add_argument("source", metavar="RUN_ID|TICKET_DIR",
                     help="an MLflow run id (with --level), or a folder `lth tickets export` wrote")
    cmd.add_argument("--level", type=int, help="the level to compact (a run id needs it)")
    cmd.add_argument("--out", required=True, help="a new or empty folder for the compact network")
    cmd.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                     "sqlite:///mlflow.db in this folder)")
    cmd.set_defaults(func=tickets_compact)


def check_out(out: Path) -> None:
    from trials.core.folders import check_folder

    check_folder(out, "--out", write=True)
    check(not out.exists() or (out.is_dir() and not any(out.iterdir())), "--out", str(out), "allowed: a new or empty folder")


def tickets_compact(args) -> int:
    from trials.export import compact

    out = Path(args.out)
    source = Path(args.source)
    if source.is_dir():
        missing = [f for f in TICKET_FILES if not (source / f).is_file()]
        check(not missing, "RUN_ID|TICKET_DIR", args.source,
              f"allowed: an MLflow run id, or a ticket folder from `lth tickets export` (this one lacks "
              f"{', '.join(missing)})")
        if args.level is not None:
            from trials.folder.record import LevelRecord
            import json

            level = LevelRecord.from_dict(json.loads((source / layout.RECORD).read_text())).level
            check(args.level == level, "--level", args.level, f"allowed: the folder's level ({level}), or none")
        check_out(out)
        run = lambda: compact.compact_folder(source, out)  # noqa: E731
    else:
        if args.level is None:
            raise ConfigError("--level", None, "allowed: a level number (a run id needs one)")
        from orchestrator.tracking import experiment_tickets

        check_out(out)
        run = lambda: experiment_tickets.compact(args.source, args.level, out, args.tracking_uri)  # noqa: E731
    try:
        result = run()
    except compact.NotExact as e:
        print(f"lth: error: {e}", file=sys.stderr)
        return 1
    r = result.report
    print(f"compact: units {r['units']['before']:,} -> {r['units']['after']:,}, parameters "
          f"{r['params']['before']:,} -> {r['params']['after']:,}, MACs per example "
          f"{r['macs_per_example']['before']:,} -> {r['macs_per_example']['after']:,} ({r['mac_ratio']:.2f}x fewer)")
    if r["kept_tied"] or r["kept_constant"]:
        print(f"kept: {r['kept_tied']} channels tied by skip connections to channels that stay, "
              f"{r['kept_constant']} constant units a padded convolution reads")
    print(f"exact: largest logit difference {r['max_logit_diff_fp64']:.2e} in float64 on {r['examples']:,} test "
          f"examples (float32 {r['max_logit_diff']:.2e}, ONNX Runtime {r['onnx_max_diff']:.2e}); effective density "
          f"{r['effective_density']:.4f} "
          f"(weights {r['density']:.4f})")
    print(f"-> {out}  (trials.export.compact.load_compact('{out}'))")
    return 0
