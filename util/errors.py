"""One-line errors for the project's command lines, with the traceback behind a switch.

A failure prints ``error: <what, and what to do>`` (masked: it may end up in a log);
``--debug`` on the command line, or ``EARSLEEP_DEBUG=1``, adds the full traceback.
``main.py`` and ``python -m util.deploy`` report errors this way.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any

from util.redact import mask_text

__all__ = [
    "DEBUG_ENV",
    "add_debug_option",
    "condense",
    "debug_requested",
    "one_line",
    "report_error",
]

#: Set (to anything but 0) for full tracebacks instead of one-line errors; so does ``--debug``.
DEBUG_ENV = "EARSLEEP_DEBUG"


def add_debug_option(parser: Any) -> None:
    """Give a jsonargparse parser the project's ``--debug`` switch (bare or ``true|false``)."""
    parser.add_argument(
        "--debug",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help=f"print the traceback of a failure (also: {DEBUG_ENV}=1)",
    )


def debug_requested() -> bool:
    """Whether ``EARSLEEP_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "0").strip() not in ("", "0")


def report_error(err: BaseException, debug: bool = False, prefix: str = "error") -> None:
    """Print ``err`` to stderr as one ``<prefix>:`` line, after its traceback when ``debug``.

    Both are masked (:func:`util.redact.mask_text`): they end up in logs, such as a
    sweep's ``run.log``, and in bug reports.
    """
    if debug:
        sys.stderr.write(mask_text("".join(traceback.format_exception(err))))
    hint = "" if debug else f" [traceback: --debug or {DEBUG_ENV}=1]"
    print(f"{prefix}: {one_line(err)}{hint}", file=sys.stderr)


#: Lines of jsonargparse's error trees that say how it searched, not what is wrong.
_STRUCTURE = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value", "- a ")


def condense(message: str) -> str:
    """One line, secrets masked, from a possibly nested multi-line error message.

    jsonargparse reports a bad value as a tree: ``Parser key "..."`` lines, one ``- ``
    line per type it tried, the value's repr. The deepest reason is the one that matters,
    with the option it belongs to and the class it was given to.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return mask_text(lines[0] if lines else "")
    reasons = [
        line.removeprefix("- ").strip()
        for line in lines
        if not line.startswith(_STRUCTURE) and "NoneType" not in line
    ]
    final = [r for r in reasons if not r.endswith(":")]
    if not final:
        return mask_text(lines[0])
    specific = [r for r in final if not r.startswith("Expected a ")]  # "not a bool", ...
    reason = (specific or final)[-1]
    before = reasons[: reasons.index(reason)]
    given_to = [re.search(r"class_path '([^']+)'", r) for r in before]
    given_to = [m.group(1) for m in given_to if m]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    where = ""
    if keys:
        where = f"--{keys[0]}" + (f" ({keys[-1]})" if len(keys) > 1 else "") + ": "
    if given_to:
        where += f"{given_to[-1]}: "
    given = next((line for line in lines if line.startswith("Given value:")), "")
    given = given.removeprefix("Given value:").strip()
    given = f" (given: {given})" if given and len(given) < 80 and "(" not in given else ""
    return mask_text(where + reason + given)


def one_line(err: BaseException) -> str:
    """:func:`condense`'d message of ``err``; the class name too when it is not ours."""
    text = condense(str(err))
    ours = type(err).__module__.split(".")[0] in ("data", "models", "util", "main", "builtins")
    if not text:
        return type(err).__name__
    return text if ours else f"{type(err).__name__}: {text}"
