"""Keeping secrets out of every file a run writes.

earsleep never takes a hub token as a config value (the sources refuse one and read
``HF_TOKEN`` or the saved login instead), so a token has no regular way into
config.yaml. These functions are the second line: whatever text or config earsleep
writes (config.yaml, JSON and CSV artifacts, the leaderboard, sweep records) passes
through them, which mask

- values of secret-named environment variables and config keys (token, password,
  secret, credentials, API keys),
- passwords inside URLs (``scheme://user:password@host``),
- hub tokens (``hf_...``), the value of a secret-named command-line option and the
  current value of any secret environment variable, wherever they appear in a string.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "mask_secrets", "mask_text", "mask_tree"]

MASK = "***"
#: An environment variable is secret when its name holds one of these (any case).
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
#: A config key is secret when its name holds one of these (``key`` alone is too common).
SECRET_KEYS = ("token", "password", "passwd", "secret", "credential", "api_key", "apikey")
_URL_CREDENTIALS = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9_]{8,}")
#: A secret-named option on a command line: ``--data.source.init_args.token VALUE``.
_SECRET_OPTION = re.compile(
    r"(--[\w.-]*(?:token|password|passwd|secret|credential|api_key|apikey)[\w.-]*[= ])(\S+)",
    re.IGNORECASE,
)
#: A secret-named key given a value in code or data: ``token='...'``, ``"password": "..."``.
_SECRET_ASSIGNMENT = re.compile(
    r"""(\b[\w.-]*(?:token|password|passwd|secret|credential|api_key|apikey)[\w.-]*['"]?"""
    r"""\s*[=:]\s*['"]?)([^'"\s,)}\]]+)""",
    re.IGNORECASE,
)
#: Shorter values would mask ordinary words.
_MIN_SECRET_LEN = 8


def _is_secret_env(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def _is_secret_key(name: str) -> bool:
    return any(marker in name.lower() for marker in SECRET_KEYS)


def mask_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """Copy of ``env`` with secret values replaced by ``***``.

    A variable is secret when its name contains TOKEN, KEY, SECRET, PASSWORD or
    CREDENTIAL (any case); passwords inside URLs (``scheme://user:password@host``)
    and hub tokens in any other value are masked too.

    Args:
        env: variable names to values.
    """
    return {name: MASK if _is_secret_env(name) else mask_text(value) for name, value in env.items()}


def _secret_values() -> list[str]:
    values = {
        value
        for name, value in os.environ.items()
        if _is_secret_env(name) and len(value) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def mask_text(text: str) -> str:
    """``text`` with URL passwords, hub tokens, secret options and environment values masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)
    text = _HUB_TOKEN.sub(MASK, text)
    text = _SECRET_OPTION.sub(rf"\1{MASK}", text)
    text = _SECRET_ASSIGNMENT.sub(
        lambda m: m.group(0) if m.group(2) in ("None", "null") else m.group(1) + MASK, text
    )
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_tree(obj: Any, key: str = "") -> Any:
    """Copy of a config-like tree with secrets masked.

    Mappings, namespaces (argparse's and jsonargparse's), lists and tuples are walked; a non-empty string under a secret-named key becomes
    ``***``, any other string goes through :func:`mask_text`. Other values are kept.

    Args:
        obj: the tree.
        key: the key ``obj`` sits under (for the secret-name rule).
    """
    if isinstance(obj, str):
        return MASK if obj and _is_secret_key(key) else mask_text(obj)
    if isinstance(obj, argparse.Namespace):
        return type(obj)(**{k: mask_tree(v, k) for k, v in vars(obj).items()})
    if isinstance(obj, Mapping):
        masked = {k: mask_tree(v, str(k)) for k, v in obj.items()}
        return type(obj)(masked) if isinstance(obj, dict) else masked
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_tree(v, key) for v in obj)
    return obj
