"""How the data floor words what went wrong underneath it."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none.

    Errors here are one line that says what is wrong and what to do; a library's
    multi-line message is cut to its first line before it is quoted in one.
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
