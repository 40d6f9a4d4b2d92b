"""Where a sweep is: the plan's counts, the live line at a terminal (a real sweep under a
pseudo-terminal), and no Tune banners on stdout."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from orchestrator import plan
from orchestrator.sweep_spec import load_sweep
from orchestrator.sweeps import progress
from tests.conftest import LTH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "sweeps", "demo_digits.yaml")


def test_the_plan_counts_trials_levels_and_iterations():
    sweep = load_sweep(DEMO, ["seeds=1", "base.prune.levels=2"])
    p = progress.Progress.of(sweep)
    # 4 trials x 3 levels; k=0: 300 + 2 x 300, k=30: 300 + 2 x 270
    assert (p.trials, p.levels, p.iterations) == (4, 12, 2 * 900 + 2 * 840)
    t = plan.totals(sweep)  # what `lth sweep plan` prints: the same counts
    assert (t.trials, t.levels, t.iterations, t.units) == (p.trials, p.levels, p.iterations, p.units)
    p.count(["done", "running"])
    p.add_level(300)
    line = p.line(elapsed=False)
    assert line.startswith(f"1 done, 1 running, 2 pending of 4 trials | levels 1/12 | units 0/{p.units} |")
    assert line.endswith(f"| {100 * 300 / 3480:.0f}% of 3,480 iterations")
    p.count(["done", "failed"])  # failures are named where there are some
    assert p.line(elapsed=False).startswith("1 done, 0 running, 2 pending, 1 failed of 4 trials |")
    assert progress.clock(3725) == "1h02m05s" and progress.clock(65) == "1m05s" and progress.clock(4) == "4s"


def test_a_saved_plan_is_read_back_for_its_sweep_only(tmp_path):
    """The driver saves the plan's totals and unit names (progress.PLAN_FILE) so `lth sweep
    status` plans nothing; the file serves only the sweep (and code) it was made for."""
    import json

    sweep = load_sweep(DEMO, ["seeds=1", "base.prune.levels=2", f"storage={tmp_path}"])
    made = progress.planned(sweep, save=True)
    t = plan.totals(sweep)
    assert (made.trials, made.levels, made.iterations, len(made.units)) == (t.trials, t.levels, t.iterations, t.units)
    path = tmp_path / sweep.name / progress.PLAN_FILE
    saved = json.loads(path.read_text())
    saved["plan"]["trials"] = 99  # what a reader takes must come from the file
    path.write_text(json.dumps(saved))
    progress._PLANS.clear()  # another process
    assert progress.planned(sweep).trials == 99
    other = load_sweep(DEMO, ["seeds=2", "base.prune.levels=2", f"storage={tmp_path}"])
    assert progress.planned(other).trials == plan.totals(other).trials == 2 * t.trials


def test_readers_load_no_torch():
    """`lth report`, `lth tickets best` and `lth sweep status` import neither torch nor the
    engine (their answer at 10,000 trials is mostly imports)."""
    code = ("import sys; import lth.cli, analysis, orchestrator.tracking.read, "
            "orchestrator.tracking.experiment_tickets, orchestrator.sweeps.progress, "
            "orchestrator.sweeps.results, orchestrator.sweeps.runner; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_status_line_fits_any_width_shortening_then_dropping_fields_from_the_right(monkeypatch):
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "prune_at_init.yaml"), [])
    p = progress.Progress.of(sweep, units_before=3)
    now = p.started + 75  # 1m15s into the sweep
    monkeypatch.setattr(progress.time, "time", lambda: now)
    p.count(["done"] * 7 + ["running"] * 2 + ["failed"])
    for _ in range(40):
        p.add_level(300)
    prefix = "prune-at-init: "
    full = p.line(prefix=prefix)
    assert len(full) > 120 and "(3 reused)" in full and "of 129,600 iterations" in full
    assert p.line(prefix=prefix, width=len(full)) == full
    widths = {}
    for width in (200, 120, 100, 79, 60, 40, 20, 8):
        line = p.line(prefix=prefix, width=width)
        assert len(line) <= width, (width, line)
        widths[width] = line
    # every field, shortened
    assert widths[100] == f"{prefix}7/72 done, 2 running, 1 failed | levels 40/432 | units 0/18 | 9% | " + \
        widths[100].rsplit(" | ", 1)[1]
    # at 79 columns (an 80-column terminal less the last) the units and levels went; the time stays
    assert widths[79].startswith(f"{prefix}7/72 done, 2 running, 1 failed | 9% | ~") and widths[79].endswith(" left")
    assert widths[120].endswith(" left") and "(3 reused)" not in widths[120]
    # narrower: then the time goes; the trials and the share stay; at last the line is cut
    assert widths[60] == f"{prefix}7/72 done, 2 running, 1 failed | 9%"
    assert widths[40].startswith(prefix + "7/72 done") and widths[40].endswith("...")
    assert all(len(p.line(prefix=prefix, width=w)) <= w for w in range(1, 200))
    # the time left runs at this driver's pace: 40 levels of 300 in 75 s; resumed with 36 of
    # them done before, 4 levels in 75 s leave ten times as long
    done = p.iterations_done
    assert p.line().endswith(f", ~{progress.clock(75 * (p.iterations - done) / done)} left")
    p.iterations_before = 36 * 300
    assert p.line().endswith(f", ~{progress.clock(75 * (p.iterations - done) / (4 * 300))} left")


def test_a_terminal_gets_one_live_line_and_stdout_no_banners(tmp_path):
    args = [LTH, "sweep", "run", DEMO, "--set", "seeds=1", "--set", "base.prune.levels=1",
            "--set", "space.rewind_iteration={grid: [0]}", "--storage", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # an 80-column terminal
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT", "COLUMNS")}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the sweep ended
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=300) == 0, err[-3000:]
    text = err.decode(errors="replace")
    lines = [s for s in re.split(r"[\r\n]+", text.replace("\x1b[K", "")) if s.strip()]
    assert not any(" level " in s and "density" in s for s in lines), "per-level lines at a terminal"
    # a line Ray copies from a worker lands behind a live line that has no newline yet: cut
    # it off (at times an idle worker's exit, "(pid=N) [mutex.cc : 452] RAW: Lock blocking")
    lines = [re.split(r"\((?:[\w:]+ )?pid=\d+", s)[0] for s in lines]
    live = [s for s in lines if s.startswith("demo-digits: ")]
    # each redraw fits the 80 columns (less the last: no wrap, no row left behind), shortened
    assert live and all(len(s) <= 79 for s in live), max(live, key=len)
    assert live[-1].startswith("demo-digits: 2/2 done | levels 4/4 | ") and " | 100% | " in live[-1]
    assert "Token authentication is enabled" not in text
    assert "test accuracy at early stop" in out
    for banner in ("Configuration for experiment", "tensorboard", "View detailed results"):
        assert banner not in out and banner not in text, banner


def test_worker_lines_copied_to_a_log_carry_no_colour_codes(tmp_path):
    """Ray copies a worker's output to the driver behind a coloured "(name pid=...)"
    prefix; a sweep whose output is no terminal (runner.quiet) gets it plain."""
    script = (
        "import time, ray\n"
        "from orchestrator.sweeps import runner\n"
        "runner.quiet()\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "@ray.remote\n"
        "def hello():\n"
        "    print('hello from a worker', flush=True)\n"
        "ray.get(hello.remote())\n"
        "time.sleep(3)  # the log monitor's copy arrives\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "pid=" in text and "hello from a worker" in text, text[-3000:]  # the line did come through
    assert "\x1b[" not in text, text[-3000:]


def test_the_live_line_shows_a_search_draw_at_four_digits():
    from trials.folder.labels import short

    assert short(0.31455680991172585) == "0.3146"
    assert short(0.2) == "0.2" and short(500) == "500" and short(2.0) == "2.0" and short("structured") == "structured"
    assert short(None) == "None" and short(float("nan")) == "nan"


_STOPPED_IN_A_CALLBACK = r"""
import os, signal, sys, threading, weakref
quiet = sys.argv[1] == "quiet"
def ray_like_sigterm_handler(signum, frame):  # what Ray's worker main loop installs
    raise SystemExit(1)
signal.signal(signal.SIGTERM, ray_like_sigterm_handler)
if quiet:  # installed from another thread, as the trial's function runs in one
    from orchestrator.sweeps.workers import quiet_exit
    t = threading.Thread(target=quiet_exit); t.start(); t.join()
class Thing: pass
def stopped_here(ref):  # the signal is handled inside a weakref callback
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000): pass
def fails_here(ref):
    raise ValueError("an unrelated failure in a callback")
a, b = Thing(), Thing()
refs = [weakref.ref(a, stopped_here), weakref.ref(b, fails_here)]
del a, b
"""


def test_a_worker_stopped_by_sigterm_inside_a_callback_prints_no_systemexit_traceback(tmp_path):
    """Ray stops a sweep's workers with SIGTERM; handled inside a weakref callback, its
    SystemExit used to reach the driver as a traceback after a good sweep (workers.py).
    Without the hook the same script prints it (the case is real); with it, only the
    unrelated failure is reported."""
    script = tmp_path / "stopped.py"
    script.write_text(_STOPPED_IN_A_CALLBACK)
    runs = {mode: subprocess.run([sys.executable, str(script), mode], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60) for mode in ("plain", "quiet")}
    assert "SystemExit: 1" in runs["plain"].stderr
    assert "SystemExit" not in runs["quiet"].stderr
    assert "ValueError: an unrelated failure in a callback" in runs["quiet"].stderr
