"""The `lth` command line. Bad input: one line on stderr naming key, value and what is
allowed, exit status 2, nothing written. Each command group lives in its own module."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from lth import report_commands, stability_commands, sweep_commands, trial_commands
from trials.core.errors import ConfigError, shown

EXIT_BAD_INPUT = 2
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


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
    except BrokenPipeError:  # `lth ... | head` closed the pipe: stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would raise again
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by one
    except OSError as e:  # a path given that cannot be used, found only while writing (root passes access checks)
        if e.filename is None or e.errno not in PATH_ERRNOS:
            raise
        print(f"lth: error: path: {shown(str(e.filename))} is not allowed; {e.strerror.lower()}", file=sys.stderr)
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


def entry() -> None:
    """The `lth` program. It ends as soon as what it did is out: other threads joined, the
    exit handlers run (Ray's shutdown, logging's flush, temporary folders), the streams
    flushed. The interpreter's own finalization, which frees every object of every module
    loaded, comes after all of that and changes nothing on disk: it took half a CPU second
    of a reader's answer (mlflow, pandas) and seconds after a Tune run (ARCHITECTURE.md,
    "The sweep runner"). An exception that escapes main() ends the process as usual."""
    code = main()
    import atexit
    import threading

    # what a normal exit does first: the hooks registered with threading (concurrent.futures
    # tells its pools' idle workers to stop there: an MLflow artifact download leaves one),
    # then every other non-daemon thread joined
    for hook in reversed(getattr(threading, "_threading_atexits", ())):
        hook()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # Ray's own exit handler first sleeps half a second for workers' last log lines;
        # a sweep's end (its tables, the MLflow replay) has given them that time already
        atexit.unregister(ray.shutdown)
        ray.shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
