"""The README's shell commands run as written, after its setup command.

Every line of every ```bash block is read as a user would paste it: comments dropped, ``\\``
continuations joined, ``&&`` chains split, ``$(...)`` and ``$VAR`` expanded by bash itself in
a scratch copy of the repository. Then each command is run, in this process (the
interpreter start is what would make it slow):

- ``main.py`` with ``--help``, ``.help`` or ``--print_config``: as written;
- ``main.py fit|validate|test|predict`` with ``config/demo.yaml``: as written plus a tiny
  corpus and one epoch (:data:`TINY`), so fit → test → export → predict really run;
- ``main.py`` with any other config (DreamCatcher, which is gated): as written plus
  ``--print_config``, so the config resolves and every flag exists;
- ``-m util.deploy.mcu``: its options parsed (the converter may live in another environment);
- ``-m util.deploy``, ``-m util.sweep`` (``--dry_run true`` added), ``-m util.night.generate``
  (a 36-second night), ``-m util.night.rederive``: as written, tiny where it says so below;
- ``benchmarks/*.py``: their arguments are parsed, nothing is measured.

A command that starts with a bare ``python`` or ``tensorboard`` fails the test: after the
setup command those are not on a user's PATH (the virtual environment is not activated).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_PYTHON = ".venv/bin/python"
#: What a scratch copy of the repository needs (linked, not copied).
LINKED = ("main.py", "config", "data", "models", "util", "benchmarks", "requirements.lock",
          "pyproject.toml")  # fmt: skip
#: Appended to demo runs: a tiny corpus and one epoch (the demo's own 4,000 clips x 12 epochs
#: take minutes). The same for every demo command, so test/predict/export find fit's caches.
TINY = [
    "--data.source.init_args.clips_per_split",
    "{train: 128, validation: 64, test: 64}",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]
#: Appended to exports: a one-epoch model on 64 clips may lose a clip or two in int8.
TINY_EXPORT = ["--max_int8_drop_pp", ".inf", "--progress", "false"]
#: Appended to the synthetic-night generator: 36 s instead of 8 hours.
TINY_NIGHT = ["--hours", "0.01"]
#: Shell commands the README shows that are not the project's (run by the user as they are).
PLAIN_SHELL = ("ls", "source")
#: Plain file commands later commands depend on (a checkpoint copied into place): run in the
#: scratch copy, as written; one that finds nothing to copy (the checkpoint of a DreamCatcher
#: run, which the test only resolves) is not a failure.
FILE_SHELL = ("mkdir", "cp")


# -- reading the README ---------------------------------------------------------------------


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash code blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def _scan(line: str) -> Iterator[tuple[int, str, bool]]:
    """``(index, char, outside)``: ``outside`` is False inside quotes or ``$( )``."""
    quote, depth = "", 0
    for i, ch in enumerate(line):
        outside = not quote and depth == 0
        yield i, ch, outside
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(" and line[i - 1 : i] == "$":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` that starts a word, outside quotes)."""
    for i, ch, outside in _scan(line):
        if ch == "#" and outside and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(line: str) -> list[str]:
    """``a && b && c`` → ``[a, b, c]`` (only ``&&`` outside quotes and ``$( )``)."""
    parts, start = [], 0
    for i, _, outside in _scan(line):
        if outside and line.startswith("&&", i) and i >= start:
            parts.append(line[start:i].strip())
            start = i + 2
    parts.append(line[start:].strip())
    return [p for p in parts if p]


def commands(block: str) -> list[str]:
    """The commands of one bash block, in order."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        line = strip_comment(line)
        if line:
            found += split_and(line)
    return found


def test_the_readme_reader_reads_like_a_shell() -> None:
    assert strip_comment('a --x "b # c"  # note') == 'a --x "b # c"'
    assert strip_comment("# only a comment") == ""
    assert split_and('a "x && y" && b $(c && d) && e') == ['a "x && y"', "b $(c && d)", "e"]
    block = "# setup\nx --a 1 \\\n    --b 2   # why\ny && z\n"
    assert commands(block) == ["x --a 1 --b 2", "y", "z"]


def readme_commands() -> list[str]:
    return [cmd for block in bash_blocks(README.read_text()) for cmd in commands(block)]


def test_the_readme_calls_the_virtual_environment_it_installs() -> None:
    """Pasted after the setup line, a bare ``python`` is not the one with torch in it."""
    found = readme_commands()
    assert len(found) > 20
    bare = [c for c in found if re.match(r"(python|tensorboard|pytest|ruff)\b", c)]
    assert not bare, f"README commands that need an activated venv: {bare}"


# -- running it -----------------------------------------------------------------------------


@contextlib.contextmanager
def argv_and_output(argv: list[str]) -> Iterator[io.StringIO]:
    out = io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out):
            yield out
    finally:
        sys.argv = saved


def exit_code(call) -> int:
    """Run ``call()``; its ``SystemExit`` code (0 when it returns; ``None`` counts as 0)."""
    try:
        result = call()
    except SystemExit as stop:
        code = stop.code
        return 0 if code is None else code if isinstance(code, int) else 1
    return result if isinstance(result, int) else 0


class _Parsed(Exception):
    """Raised by a patched ``ArgumentParser.parse_args`` once the arguments parsed."""


def parse_only(script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a script's ``__main__`` until its argparse has parsed ``args``; 0 if it parsed."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args_=None, namespace=None):
        original(self, args_, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    try:
        with argv_and_output([str(script), *args]):
            code = exit_code(lambda: runpy.run_path(str(script), run_name="__main__"))
    except _Parsed:
        code = 0
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    return code


def expand(command: str, env: dict[str, str], cwd: Path) -> list[str]:
    """The argv bash makes of ``command`` in ``cwd`` with the README's earlier variables."""
    script = 'eval "set -- $1"; printf "%s\\0" "$@"'
    done = subprocess.run(
        ["bash", "-c", script, "_", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split("\0")[:-1]


def assign(command: str, env: dict[str, str], cwd: Path) -> None:
    """Run a ``NAME=value`` line in bash and keep the value for later commands."""
    name = command.split("=", 1)[0]
    done = subprocess.run(
        ["bash", "-c", f'{command}; printf "%s" "${name}"'],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    env[name] = done.stdout


def run_main(args: list[str]) -> int:
    import main

    return exit_code(lambda: main.main(args))


def run_python(argv: list[str], sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run one ``.venv/bin/python ...`` command; ``None`` if it worked, else what failed."""
    args = argv[1:]
    if args[0] == "main.py":
        rest = args[1:]
        cheap = any(a in ("--help", "-h", "--print_config") or a.endswith(".help") for a in rest)
        demo = "config/demo.yaml" in rest
        if not cheap:
            rest = rest + (TINY if demo else ["--print_config"])
        if "--ckpt_path" in rest and demo:
            ckpt = rest[rest.index("--ckpt_path") + 1]
            if not (sandbox / ckpt).is_file():
                return f"--ckpt_path {ckpt!r} names no file"
        with argv_and_output(["main.py"]):  # LightningCLI reads args=, not sys.argv
            code = run_main(rest)
    elif args[:2] == ["-m", "util.deploy.mcu"]:
        from util.deploy.mcu.__main__ import build_parser

        try:  # its converter may live in another environment: the options are checked
            build_parser().parse_args(args[2:])
        except (SystemExit, Exception) as err:  # noqa: BLE001 - reported as the failure
            return f"util.deploy.mcu refuses its options: {err}"
        code = 0
    elif args[:2] == ["-m", "util.deploy"]:
        from util.deploy.__main__ import main as export_main

        rest = args[2:] + ([] if "--help" in args else TINY_EXPORT)
        with argv_and_output(["util.deploy", *rest]):
            code = exit_code(lambda: export_main(rest))
    elif args[:2] == ["-m", "util.sweep"]:
        from util import sweep

        rest = args[2:] + ["--dry_run", "true"]  # the last value wins
        with argv_and_output(["util.sweep", *rest]):
            code = exit_code(lambda: sweep.main(rest))
    elif args[:2] == ["-m", "util.night.generate"]:
        from util.night import generate as night

        rest = args[2:] + TINY_NIGHT
        with argv_and_output(["night", *rest]):
            code = exit_code(lambda: night.main(rest))
    elif args[:2] == ["-m", "util.night.rederive"]:
        from util.night import rederive

        rest = args[2:]
        with argv_and_output(["rederive", *rest]):
            code = exit_code(lambda: rederive.main(rest))
    elif args[:2] == ["-m", "pytest"]:
        return None  # the suite itself (what CI runs)
    elif args[0].startswith("benchmarks/") and args[0].endswith(".py"):
        script = sandbox / args[0]
        if not script.is_file():
            return f"no script {args[0]}"
        code = parse_only(script, args[1:], monkeypatch)
    else:
        return "a Python command this test does not know how to run: teach it"
    return None if code == 0 else f"exit status {code}"


def test_readme_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox = tmp_path / "earsleep"
    sandbox.mkdir()
    for name in LINKED:
        (sandbox / name).symlink_to(ROOT / name)
    monkeypatch.chdir(sandbox)
    env: dict[str, str] = {}
    seen: set[tuple[str, ...]] = set()
    failures: list[str] = []
    ran = 0
    for command in readme_commands():
        words = shlex.split(command, posix=True) if "$" not in command else command.split()
        if re.fullmatch(r"[A-Z_]+=.*", command):
            assign(command, env, sandbox)
            continue
        if words[0] in PLAIN_SHELL:
            continue
        if words[0] in FILE_SHELL:
            subprocess.run(
                ["bash", "-c", command],
                cwd=sandbox,
                env={**os.environ, **env},
                capture_output=True,
                check=False,
            )
            continue
        if words[:3] == ["python3", "-m", "venv"]:
            continue  # the setup command; CI (.ci/run) does the same install
        if words[0].endswith("/bin/pip"):  # this venv's, or another the README sets up
            if "-r" in words:
                assert (ROOT / words[words.index("-r") + 1]).is_file(), command
            continue
        if words[0] in (".venv/bin/ruff", ".venv/bin/uv"):
            continue  # CI runs ruff; uv refreshes the lock from the package index
        if words[0] == ".venv/bin/tensorboard":
            if not (Path(sys.prefix) / "bin" / "tensorboard").is_file():
                failures.append(f"{command}: no tensorboard in the virtual environment")
            continue
        if words[0] != VENV_PYTHON:
            failures.append(f"{command}: not a command this test knows")
            continue
        argv = expand(command, env, sandbox)
        key = tuple(argv)
        if key in seen:
            continue  # the setup line's fit and test are the quick start's
        seen.add(key)
        ran += 1
        problem = run_python(argv, sandbox, monkeypatch)
        if problem:
            failures.append(f"{command}: {problem}")
    assert not failures, "README commands that fail as written:\n" + "\n".join(failures)
    assert ran >= 20
    # the demo's fit, test, export and predict really ran
    assert list(sandbox.glob("log/demo/version_*/checkpoints/best-*.ckpt"))
    assert list(sandbox.glob("log/demo/version_*/export/tinycnn.int8.onnx"))
    assert list(sandbox.glob("log/demo/version_*/test/version_*/test_metrics.csv"))
