"""The `lth` command line. Bad input: one line on stderr naming key, value and what is
allowed, exit status 2, nothing written. Each command group lives in its own module."""
from __future__ import annotations

import argparse
import sys

from lth import report_commands, stability_commands, sweep_commands, trial_commands
from trials.errors import ConfigError

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"lth: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lth", description="Lottery-ticket sweeps on Ray.")
    commands = parser.add_subparsers(title="commands")
    trial_commands.add(commands)
    sweep_commands.add(commands)
    report_commands.add_tickets(commands)
    report_commands.add_reports(commands)
    stability_commands.add(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
