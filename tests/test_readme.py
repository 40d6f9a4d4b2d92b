"""The README's `lth` commands stay true to the command line: each one's subcommand and
flags parse as written (argparse, nothing run), each sweep file it names exists and
validates, and each `plan`/`show`/`presets` line, which needs no data, GPU or network,
runs to exit 0. (Running the sweeps themselves is `make demo`'s and the sweep tests' job.)"""
import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from lth.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].split(" > ")[0].strip()
            if line.startswith("lth "):
                out.append(line)
    return out


COMMANDS = readme_commands()
PLACEHOLDERS = {"$COMMON": "--preset lenet_mnist_frankle2019", "$K": "supermask.densities=[0.5]", "$seed": "0"}


def argv(line: str) -> list[str]:
    for name, value in PLACEHOLDERS.items():
        line = line.replace(f'"{name}"', shlex.quote(value)).replace(name, value)
    return shlex.split(line)[1:]


def test_the_readme_has_its_commands():
    assert len(COMMANDS) >= 20 and any(c.startswith("lth sweep run sweeps/") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_each_readme_command_parses_and_names_files_that_exist(line, monkeypatch, tmp_path):
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv(line))
        except SystemExit as e:
            pytest.fail(f"{line}: argparse refused it ({e.code}): {err.getvalue().strip()}")
    assert getattr(args, "func", None), line
    for word in argv(line):
        if word.startswith("sweeps/"):
            assert (ROOT / word).is_file(), f"{line}: {word} does not exist"


@pytest.mark.parametrize("line", [c for c in COMMANDS if c.split()[1:3] in (["sweep", "plan"], ["trial", "presets"])])
def test_readme_commands_that_need_nothing_run(line, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HOME", str(tmp_path))  # the ablation's data_dir ~/data must exist
    (tmp_path / "data").mkdir()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv(line))
    assert code == 0, (line, err.getvalue())
    assert out.getvalue().strip(), line
