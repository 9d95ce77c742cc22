"""The sweep manifest: YAML in, a checked plan of run specs out.

Manifest (YAML)::

    name: reference                     # default output: log/sweeps/<name>
    seeds: [0, 1, 2]
    common_args: {trainer.enable_progress_bar: false}   # every run, dotted keys
    bootstrap: {resamples: 1000, seed: 0}
    models:                             # base configs (and pinned settings) per model
      tinycnn: {configs: [config/tinycnn.yaml]}
      tinycnn_cbam:
        configs: [config/tinycnn_cbam.yaml]
        args: {model.init_args.backbone.init_args.reduction: 8}
    phase1:                             # run specs
      - {name: tinycnn, model: tinycnn}
      - name: tinycnn_cbam_r{reduction}  # {axis} takes the grid value
        model: tinycnn_cbam
        grid:
          reduction: {key: model.init_args.backbone.init_args.reduction, values: [4, 8, 16]}
    gate:
      teacher: crnn                     # a phase-1 run name
      students: null                    # phase-1 names; default: all but the teacher
      margin: 0.03                      # mean validation macro-F1 the teacher must lead by
      tuning: [run specs...]            # trained only when the gate fails
      on_fail: stop                     # still not met after tuning: stop (no phase 2, the
                                        # default) or distil from the best teacher anyway
    phase2:
      - name: kd_tinycnn_a{alpha}_T{temperature}
        model: kd_tinycnn               # its configs use models.distillation.DistillationClassifier
        baseline: tinycnn               # phase-1 run of the same student without a teacher
        grid: {alpha: {key: model.init_args.alpha, values: [0.3, 0.6, 0.9]}, ...}

A run spec has ``name`` (a template over its grid axes), ``model``, optional
``args`` (dotted key → value) and ``grid`` (axis → ``{key, values}``, or
``{values: [{label, args}, ...]}`` when one grid value sets several keys). A run's
command line is its model's configs, then the model's ``args``, ``common_args``,
the spec's ``args`` and the grid's, in that order (later wins). Two specs of a
phase whose configs and merged settings are equal are one run (the first name is
kept, the others become its ``aliases``): that is how a default configuration and
the same point of a grid collapse.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ON_FAIL",
    "PHASES",
    "PHASE_TITLES",
    "ROOT",
    "Manifest",
    "ManifestError",
    "Spec",
    "cli_value",
    "load_manifest",
]

#: The repository root: config paths in a manifest are relative to it.
ROOT = Path(__file__).resolve().parents[2]
PHASES = ("phase1", "tuning", "phase2")
PHASE_TITLES = {"phase1": "phase 1", "tuning": "teacher tuning", "phase2": "phase 2"}
#: What ``gate.on_fail`` may say: without a teacher that meets the margin, ``stop`` runs
#: no phase 2 (the default), ``distil`` distils from the best candidate anyway.
ON_FAIL = ("stop", "distil")
_GATE_KEYS = {"teacher", "students", "margin", "tuning", "on_fail"}


class ManifestError(ValueError):
    """The sweep manifest is malformed; the message says where."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One seed-independent run of a phase: a name, a model and its command-line settings."""

    name: str
    model: str
    args: tuple[tuple[str, Any], ...]
    labels: tuple[tuple[str, Any], ...] = ()
    baseline: str | None = None
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass
class Manifest:
    """A parsed sweep manifest (see the module docstring for the YAML)."""

    name: str
    seeds: list[int]
    models: dict[str, dict[str, Any]]
    common_args: dict[str, Any]
    phase1: list[Spec]
    phase2: list[Spec]
    teacher: str
    students: list[str]
    margin: float
    tuning: list[Spec]
    on_fail: str = "stop"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    path: Path | None = None


def cli_value(value: Any) -> str:
    """A setting as ``main.py`` reads it on the command line (JSON unless a string)."""
    return value if isinstance(value, str) else json.dumps(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def _settings(configs: Sequence[str], args: Iterable[tuple[str, Any]]) -> str:
    """Identity of a run's configuration: configs plus merged, flattened settings."""
    merged: dict[str, Any] = {}
    for key, value in args:
        flat: dict[str, Any] = {}
        _flatten(key, value, flat)
        # Nothing set earlier is dropped: jsonargparse may keep inner values when a
        # whole value (``--model X``) follows, and two runs wrongly taken for one is
        # worse than a duplicate run.
        merged.update(flat)
    return json.dumps([list(configs), sorted(merged.items())], sort_keys=True, default=str)


def _grid_axes(raw: Mapping[str, Any], where: str) -> list[tuple[str, list[tuple[Any, list]]]]:
    """``[(axis, [(label, [(key, value), ...]), ...]), ...]`` of a spec's ``grid``."""
    axes = []
    for axis, spec in (raw.get("grid") or {}).items():
        if not isinstance(spec, Mapping) or not spec.get("values"):
            raise ManifestError(f"{where}: grid axis {axis!r} needs a non-empty 'values' list")
        points = []
        for value in spec["values"]:
            if "key" in spec:
                points.append((value, [(spec["key"], value)]))
            elif isinstance(value, Mapping) and "args" in value:
                points.append((value.get("label", len(points)), list(value["args"].items())))
            else:
                raise ManifestError(
                    f"{where}: grid axis {axis!r} needs a 'key', or values of the form "
                    "{label: ..., args: {...}}"
                )
        axes.append((axis, points))
    return axes


def _expand(raw: Any, where: str, models: Mapping[str, Any]) -> list[Spec]:
    """The specs of one run spec: one per point of its grid."""
    if not isinstance(raw, Mapping) or "name" not in raw or "model" not in raw:
        raise ManifestError(f"{where}: a run spec needs 'name' and 'model', got {raw!r}")
    unknown = set(raw) - {"name", "model", "args", "grid", "baseline"}
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    if raw["model"] not in models:
        raise ManifestError(f"{where}: model {raw['model']!r} is not under 'models:'")
    base_args = list((raw.get("args") or {}).items())
    axes = _grid_axes(raw, where)
    specs = []
    for combo in itertools.product(*(points for _, points in axes)) if axes else [()]:
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo, strict=True)}
        try:
            name = str(raw["name"]).format(**{k: _fmt(v) for k, v in labels.items()})
        except (KeyError, IndexError) as err:
            raise ManifestError(
                f"{where}: name template {raw['name']!r} uses {err}, not a grid axis"
            ) from err
        args = base_args + [kv for _, point_args in combo for kv in point_args]
        specs.append(
            Spec(
                _safe_name(name),
                raw["model"],
                tuple(args),
                tuple(labels.items()),
                raw.get("baseline"),
            )
        )
    return specs


def _dedupe(
    specs: list[Spec], models: Mapping[str, Any], common: Mapping[str, Any], known: dict[str, Spec]
) -> list[Spec]:
    """Drop specs equal to an earlier one (kept in ``known``: settings → spec)."""
    kept = []
    for spec in specs:
        model = models[spec.model]
        key = _settings(model["configs"], [*model["args"].items(), *common.items(), *spec.args])
        if key in known:
            first = known[key]
            known[key] = dataclasses.replace(first, aliases=(*first.aliases, spec.name))
            kept = [known[key] if s.name == first.name else s for s in kept]
            continue
        known[key] = spec
        kept.append(spec)
    names = [s.name for s in kept]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"run names {dupes} are used by different configurations")
    return kept


def _canonical(specs: Sequence[Spec], name: str) -> str:
    """The kept name of the spec ``name`` is (or is an alias of); ``name`` if none."""
    for spec in specs:
        if name == spec.name or name in spec.aliases:
            return spec.name
    return name


def _phase(
    raw: Sequence[Any],
    where: str,
    models: Mapping[str, Any],
    common: Mapping[str, Any],
    known: dict[str, Spec],
) -> list[Spec]:
    """Every spec of a phase's list of run specs, duplicates collapsed."""
    specs = [s for i, r in enumerate(raw) for s in _expand(r, f"{where}[{i}]", models)]
    return _dedupe(specs, models, common, known)


def load_manifest(path: str | os.PathLike[str], root: str | os.PathLike[str] = ROOT) -> Manifest:
    """Read and check a sweep manifest.

    Args:
        path: the YAML file.
        root: folder the config paths are relative to (the repository root).

    Raises:
        ManifestError: on a missing key, unknown model, missing config file, a name
            template without its axis, or a gate / baseline naming no phase-1 run.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}: expected a YAML mapping")
    for key in ("seeds", "models", "phase1", "gate", "phase2"):
        if key not in raw:
            raise ManifestError(f"{path}: missing '{key}'")
    models: dict[str, dict[str, Any]] = {}
    for name, model in raw["models"].items():
        configs = list(model.get("configs") or [])
        for config in configs:
            if not (Path(root) / config).is_file():
                raise ManifestError(f"{path}: model {name!r}: config {config} does not exist")
        models[name] = {"configs": configs, "args": dict(model.get("args") or {})}
    common = dict(raw.get("common_args") or {})
    known: dict[str, Spec] = {}
    phase1 = _phase(raw["phase1"], "phase1", models, common, known)
    gate = raw["gate"] or {}
    if not isinstance(gate, Mapping):
        raise ManifestError(f"{path}: gate must be a mapping (teacher, margin, ...), got {gate!r}")
    unknown = set(gate) - _GATE_KEYS
    if unknown:
        raise ManifestError(f"{path}: gate: unknown keys {sorted(unknown)} ({sorted(_GATE_KEYS)})")
    on_fail = gate.get("on_fail", "stop")
    if on_fail not in ON_FAIL:
        raise ManifestError(f"{path}: gate.on_fail must be one of {list(ON_FAIL)}, got {on_fail!r}")
    names = {s.name for s in phase1} | {a for s in phase1 for a in s.aliases}
    teacher = gate.get("teacher")
    if teacher not in names:
        raise ManifestError(
            f"{path}: gate.teacher {teacher!r} is not a phase-1 run ({sorted(names)})"
        )
    teacher = _canonical(phase1, teacher)
    students = [_canonical(phase1, s) for s in gate.get("students") or [s.name for s in phase1]]
    students = [s for s in dict.fromkeys(students) if s != teacher]
    for s in students:
        if s not in names:
            raise ManifestError(f"{path}: gate.students: {s!r} is not a phase-1 run")
    tuning = _phase(gate.get("tuning") or [], "gate.tuning", models, common, dict(known))
    tuning = [s for s in tuning if s.name not in names]
    phase2 = _phase(raw["phase2"], "phase2", models, common, {})
    for spec in phase2:
        if spec.baseline is not None and spec.baseline not in names:
            raise ManifestError(
                f"{path}: phase2 {spec.name}: baseline {spec.baseline!r} is not a phase-1 run"
            )
    phase2 = [
        dataclasses.replace(s, baseline=s.baseline and _canonical(phase1, s.baseline))
        for s in phase2
    ]
    boot = raw.get("bootstrap") or {}
    return Manifest(
        name=str(raw.get("name") or path.stem),
        seeds=[int(s) for s in raw["seeds"]],
        models=models,
        common_args=common,
        phase1=phase1,
        phase2=phase2,
        teacher=teacher,
        students=students,
        margin=float(gate.get("margin", 0.0)),
        tuning=tuning,
        on_fail=on_fail,
        bootstrap_resamples=int(boot.get("resamples", 1000)),
        bootstrap_seed=int(boot.get("seed", 0)),
        path=path,
    )
