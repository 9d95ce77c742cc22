"""Declared dependencies: every import is declared, and CI's lock file still matches pyproject.toml.

CI installs ``requirements.lock`` (exact versions with hashes); users install pyproject.toml's
ranges. These tests fail when the two drift apart (a dependency added to pyproject.toml but
not locked, a range the locked version no longer satisfies, a locked package that nothing
asks for any more) or when the code imports a package that pyproject.toml does not name.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PROJECT = "earsleep (pyproject.toml)"
#: The application's own top-level packages and modules (run from the repository root).
OWN = {"data", "models", "util", "main", "tests", "benchmarks"}
#: Folders whose imports are the application's (runtime dependencies); tests may also use dev ones.
RUNTIME_CODE = ("main.py", "data", "models", "util", "benchmarks")
#: The extras CI's lock holds besides the dependencies (the README's lock command names them).
LOCKED_EXTRAS = ("dev", "mcu")
#: Code that may import an extra's packages, and those extras (``mcu-convert`` is not locked:
#: its modules may be absent where the tests run).
EXTRA_CODE = {
    "util/deploy/mcu": ("mcu", "mcu-convert"),
    "benchmarks/mcu.py": ("mcu", "mcu-convert"),
}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared(*extras: str) -> dict[str, Requirement]:
    """pyproject.toml's requirements by canonical name (``extras``: also theirs)."""
    project = pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    reqs = [Requirement(s) for s in specs]
    return {canonicalize_name(r.name): r for r in reqs}


@dataclass
class Locked:
    """One pinned line of the lock file."""

    name: str
    version: str
    marker: str | None
    hashes: list[str]
    via: list[str] = field(default_factory=list)


def read_lock(path: Path = LOCK) -> list[Locked]:
    """Parse a ``uv pip compile --generate-hashes`` (pip-tools format) lock file."""
    entries: list[Locked] = []
    in_via = False
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if comment.startswith("via") and entries:
                rest = comment[3:].strip()
                in_via = not rest
                if rest:
                    entries[-1].via.append(rest)
            elif in_via and entries and line.startswith("    #   "):
                entries[-1].via.append(comment)
            else:
                in_via = False
            continue
        in_via = False
        spec, *hashes = re.split(r"\s+--hash=", stripped)
        req = Requirement(spec.strip())
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"lock line not pinned to one version: {stripped[:80]}"
        entries.append(
            Locked(
                canonicalize_name(req.name),
                pins[0].version,
                str(req.marker) if req.marker else None,
                [h.strip() for h in hashes],
            )
        )
    return entries


def test_the_lock_satisfies_pyproject_and_nothing_else_is_direct() -> None:
    """Refresh with the command in the lock's header (README, Development) when this fails."""
    wanted = declared(*LOCKED_EXTRAS)
    lock = read_lock()
    by_name: dict[str, list[Locked]] = {}
    for entry in lock:
        by_name.setdefault(entry.name, []).append(entry)
    missing = sorted(set(wanted) - set(by_name))
    assert not missing, f"in pyproject.toml but not in requirements.lock: {missing}"
    for name, req in wanted.items():
        for entry in by_name[name]:
            assert req.specifier.contains(entry.version, prereleases=True), (
                f"requirements.lock pins {name}=={entry.version}, pyproject.toml asks for {req}"
            )
    direct = {e.name for e in lock if PROJECT in e.via}
    assert direct == set(wanted), (
        f"the lock's direct requirements differ from pyproject.toml's: "
        f"only locked {sorted(direct - set(wanted))}, only declared {sorted(set(wanted) - direct)}"
    )
    unhashed = [e.name for e in lock if not e.hashes]
    assert not unhashed, f"lock entries without hashes: {unhashed}"


def test_the_lock_parser_sees_what_a_drifted_lock_lacks(tmp_path: Path) -> None:
    """The check above can fail: a lock missing a declared package or pinning outside its range."""
    text = LOCK.read_text()
    entries = read_lock()
    assert len(entries) > 50 and all(e.hashes for e in entries)
    torch_pin = next(e for e in entries if e.name == "torch")
    assert declared()["torch"].specifier.contains(torch_pin.version)
    drifted = tmp_path / "requirements.lock"
    drifted.write_text(re.sub(r"(?m)^torch==[^ ]+", "torch==2.10.0", text))
    pinned = {e.name: e.version for e in read_lock(drifted)}
    assert pinned["torch"] == "2.10.0"
    assert not declared()["torch"].specifier.contains(pinned["torch"])


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _python_files(*parts: str) -> list[Path]:
    files = []
    for part in parts:
        path = ROOT / part
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _undeclared(
    files: list[Path], allowed: dict[str, Requirement], optional: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Imports no declared distribution provides; ``optional``: declared names that may be absent."""
    distributions = importlib.metadata.packages_distributions()
    problems = {}
    for module in sorted(set().union(*(_imports(f) for f in files))):
        if module in sys.stdlib_module_names or module in OWN or module == "__future__":
            continue
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        conditional = allowed.get(canonicalize_name(module))
        if not dists and conditional is not None and conditional.marker is not None:
            continue  # e.g. tomli, declared for Python < 3.11 only
        if not dists and canonicalize_name(module) in optional:
            continue  # an unlocked extra's module (e.g. litert_torch), not installed here
        if not dists:
            problems[module] = "imported, but no installed distribution provides it"
        elif not dists & set(allowed):
            problems[module] = f"provided by {sorted(dists)}, which pyproject.toml does not declare"
    return problems


def test_every_third_party_import_of_the_application_is_a_runtime_dependency() -> None:
    extra_files = set(_python_files(*EXTRA_CODE))
    core = [f for f in _python_files(*RUNTIME_CODE) if f not in extra_files]
    problems = _undeclared(core, declared())
    assert not problems, problems
    for part, extras in EXTRA_CODE.items():
        unlocked = {
            name for extra in extras if extra not in LOCKED_EXTRAS for name in declared(extra)
        } - set(declared())
        problems = _undeclared(_python_files(part), declared(*extras), frozenset(unlocked))
        assert not problems, (part, problems)


def test_every_third_party_import_of_the_tests_is_declared() -> None:
    problems = _undeclared(_python_files("tests"), declared(*LOCKED_EXTRAS))
    assert not problems, problems
