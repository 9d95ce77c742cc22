"""Whether a trained model fits the data it is given: one rule, one-line refusals.

A checkpoint carries what its model was trained on (``hyper_parameters``: the backbone's
``class_path``, ``class_names``, ``input_shape`` and, since the front end became part of the
contract, ``features``: the :meth:`data.features.LogMelFrontEnd.config` of its front end).
:func:`check_compatible` compares those with what a data module (or a cache, or an export)
would feed the model and raises :class:`IncompatibleError` naming both values, so a model is
never silently run on other classes, another input shape or other features than it learnt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["IncompatibleError", "check_compatible", "feature_differences"]


class IncompatibleError(ValueError):
    """A model and its data disagree on classes, input shape or features (one-line message)."""


def feature_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``"name: trained X, given Y"`` for every front-end parameter that differs."""
    keys = sorted(set(theirs) | set(ours))
    return [
        f"{k}: trained {theirs.get(k)!r}, given {ours.get(k)!r}"
        for k in keys
        if theirs.get(k) != ours.get(k)
    ]


def _class_name(spec: object) -> str | None:
    """Class name of a ``class_path`` spec (a mapping or namespace), or of a class."""
    path = getattr(spec, "class_path", None)
    if path is None and isinstance(spec, Mapping):
        path = spec.get("class_path")
    if path:
        return str(path).rsplit(".", 1)[-1]
    return getattr(spec, "__name__", None)


def check_compatible(
    hparams: Mapping[str, Any],
    *,
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    feature_config: Mapping[str, Any] | None = None,
    backbone: object | None = None,
    what: str = "the checkpoint",
    fix: str = "pass the config the model was trained with (config.yaml in its run folder)",
) -> None:
    """Refuse a trained model whose training facts differ from what it would be given.

    Only the facts passed are compared, and only those the model recorded (a checkpoint
    written before the front end was saved in it has no ``features``).

    Args:
        hparams: the model's hyper-parameters (a checkpoint's ``hyper_parameters``).
        class_names: the classes the data has, in label order.
        input_shape: ``(C, F, T)`` of the data's features; ``C`` and ``F`` must match
            (``T`` is a dynamic axis for every backbone).
        feature_config: the data's front-end configuration.
        backbone: the backbone the config asks for (class or ``class_path`` spec).
        what: how to name the model in messages (e.g. ``--ckpt_path run/best.ckpt``).
        fix: what the message tells the user to do.

    Raises:
        IncompatibleError: naming the fact, the trained value and the given one.
    """
    if backbone is not None and hparams.get("backbone") is not None:
        ours, theirs = _class_name(backbone), _class_name(hparams["backbone"])
        if ours != theirs:
            raise IncompatibleError(f"{what} holds a {theirs}, the config asks for a {ours}; {fix}")
    trained_classes = list(hparams.get("class_names") or [])
    if class_names is not None and trained_classes and trained_classes != list(class_names):
        raise IncompatibleError(
            f"{what} was trained for classes {trained_classes}, the data has "
            f"{list(class_names)}; {fix}"
        )
    trained_shape = hparams.get("input_shape")
    if (
        input_shape is not None
        and trained_shape is not None
        and tuple(trained_shape)[:2] != tuple(input_shape)[:2]
    ):
        raise IncompatibleError(
            f"{what} takes features {tuple(trained_shape)}, the data gives "
            f"{tuple(input_shape)}; {fix}"
        )
    trained_features = hparams.get("features")
    if feature_config is not None and trained_features:
        diffs = feature_differences(trained_features, feature_config)
        if diffs:
            raise IncompatibleError(
                f"{what} was trained on other features than the data config gives "
                f"({'; '.join(diffs)}); {fix}"
            )
