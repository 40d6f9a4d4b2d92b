"""The `lth` that tests/test_readme.py puts first on PATH while it runs the README's shell
blocks: the real command line (`lth.cli.main`), given the README's arguments as written
plus the shrinking below, so a block that trains for hours on a GPU cluster runs in
seconds here. Shrinking only appends `--set`s (the last one wins) and swaps the values of
a few flags; it never drops an argument. Each call is logged (argv as run, exit status,
seconds in `main`: where the test's time goes) to $LTH_README_LOG as a JSON line."""
import json
import os
import sys
import time

# Appended to every `lth sweep run FILE` and `lth sweep plan FILE` (a plan of a sweep whose
# name exists must be that sweep, as for run), by FILE's name: one seed, one pruned level,
# short training (longer than the latest rewind point: the ablation's late one moves from
# 500 to 20), no GPU (the README's own instruction for a machine without one).
SWEEP_RUN = {
    "lenet_mnist_ablation.yaml": ["seeds=1", "base.prune.levels=1", "space.rewind_iteration={grid: [0, 20]}",
                                  "base.train.iterations=60", "base.train.eval_interval=30", "resources.gpu=0",
                                  "max_concurrent=2"],
    "demo_digits.yaml": ["seeds=1", "base.prune.levels=1", "base.train.iterations=60", "base.train.eval_interval=30"],
    "prune_at_init.yaml": ["seeds=1", "base.prune.levels=1", "base.train.iterations=60", "base.train.eval_interval=30",
                           "space.control={grid: [none, shuffle]}", "max_concurrent=1"],
    "stability_conv2_digits.yaml": ["seeds=1", "base.prune.levels=1", "base.stability.levels=[0, 1]",
                                    "base.train.iterations=40", "base.train.eval_interval=20",
                                    "space.rewind_iteration={grid: [0, 16]}"],
}
# Appended to `lth trial run` and `lth stability find`: short training, one pruned level
# (unless the line asks for none).
TRIAL = ["train.iterations=120", "train.eval_interval=60"]
# Flag values swapped, by command: the README's level 7 / level 4 and rewind grid up to
# 2000 become what the shrunk runs have.
SWAP = {("tickets", "export"): {"--level": "1"}, ("tickets", "compact"): {"--level": "1"},
        ("stability", "find"): {"--level": "1", "--grid": "0,100"}}

# Experiment names the README uses as examples of "any sweep" -> one its earlier blocks made.
EXAMPLE_EXPERIMENTS = {"eb": "prune-at-init"}


def shrink(argv: list[str]) -> list[str]:
    argv = list(argv)
    command = tuple(argv[:2])
    for flag, value in SWAP.get(command, {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    if "--experiment" in argv and argv[argv.index("--experiment") + 1] in EXAMPLE_EXPERIMENTS:
        argv[argv.index("--experiment") + 1] = EXAMPLE_EXPERIMENTS[argv[argv.index("--experiment") + 1]]
    if command in (("sweep", "run"), ("sweep", "plan")):
        argv += [x for s in SWEEP_RUN[os.path.basename(argv[2])] for x in ("--set", s)]
    if command in (("trial", "run"), ("stability", "find")):
        levels = [] if "prune.levels=0" in argv else ["prune.levels=1"]
        argv += [x for s in TRIAL + levels for x in ("--set", s)]
    if command in (("tickets", "export"), ("tickets", "compact")) and argv[2] == "RUN_ID":  # the README's placeholder
        from orchestrator.tracking import experiment_tickets

        argv[2] = experiment_tickets.best("lenet-mnist")[0]["run_id"]
    return argv


if __name__ == "__main__":
    from lth.cli import main

    argv = shrink(sys.argv[1:])
    start = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    with open(os.environ["LTH_README_LOG"], "a") as log:
        log.write(json.dumps({"argv": argv, "code": code, "seconds": round(time.monotonic() - start, 1)}) + "\n")
    sys.exit(code)
