"""The README runs as written: its Python snippets execute, its shell commands' flags parse.

Python blocks run in order in one namespace per file (a later snippet may use an earlier
one's names), in a scratch directory. Shell lines that call ``train.py`` are parsed by the CLI
itself (``--print_config`` for ``fit`` / ``validate``; ``compare`` and ``frontier`` through their
own parsers, ``frontier``'s spec loaded);
lines that call a script of ``benchmarks/`` or ``experiments/`` must name an existing script
whose ``--help`` lists every flag the line uses.
"""

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


INLINE = re.compile(r"`((?:OMP_NUM_THREADS=\d+ )?python [^`]+)`")


def shell_commands(path: Path) -> list[list[str]]:
    """Each ``python ...`` command of the bash blocks and inline code spans, as argv after the
    interpreter."""
    commands = []
    # an inline span may wrap across lines of the markdown: it is still one command
    spans = [span.replace("\n", " ") for span in INLINE.findall(path.read_text())]
    for body in [*blocks(path, "bash"), *spans]:
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words and words[0].endswith("python"):
                    commands.append(words[1:])
    return commands


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(ROOT))) for p in DOCS if blocks(p, "python")],
)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": "__readme__"}
    for index, snippet in enumerate(blocks(path, "python")):
        code = compile(snippet, f"{path.name}[python block {index}]", "exec")
        exec(code, namespace)  # the documentation's own code


def _train_commands():
    found = []
    for path in DOCS:
        for argv in shell_commands(path):
            if argv and argv[0] == "train.py":
                found.append(pytest.param(argv[1:], id=f"{path.name}: {' '.join(argv[1:])[:60]}"))
    return found


@pytest.mark.parametrize("args", _train_commands())
def test_train_commands_parse(args, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    from models.cli import cli_main

    command = args[0]
    if command == "compare":
        from experiments.compare import build_parser

        build_parser().parse_args(args[1:])
        return
    if command == "frontier":
        from experiments.frontier import build_parser, load_spec

        load_spec(build_parser().parse_args(args[1:]).spec)  # the spec must exist and be valid
        return
    assert command in ("fit", "validate"), f"unexpected train.py command {command!r}"
    # A checkpoint the README points at need not exist here; the flags must still parse.
    argv = [arg if not arg.endswith(".ckpt") else str(tmp_path / "x.ckpt") for arg in args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()


def _script_commands():
    found = []
    for path in DOCS:
        for argv in shell_commands(path):
            if argv and argv[0].startswith(("benchmarks/", "experiments/", "examples/")):
                found.append(pytest.param(argv, id=f"{path.name}: {' '.join(argv)[:60]}"))
    return found


@pytest.mark.parametrize("argv", _script_commands())
def test_script_commands_exist_and_know_their_flags(argv):
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    flags = {arg.split("=")[0] for arg in argv[1:] if arg.startswith("--")}
    if not flags:
        return
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    missing = [flag for flag in flags if flag not in result.stdout]
    assert not missing, f"{argv[0]} --help does not list {missing}"
