"""A non-editable install (a wheel, `pip install .`) holds every package of the tree: the
`packages` list in pyproject.toml names each folder with an `__init__.py` under the mapped
top-level folders. The editable install the tests run from finds unlisted folders anyway,
so only this check notices one missing (loradock.commands once was: the CLI of an installed
wheel could not start)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def package_folders(package_dir: dict[str, str]) -> dict[str, Path]:
    """Every importable package under the mapped folders -> its folder."""
    found = {}
    for top in ("loradock", *(name for name in package_dir if name.count(".") == 1)):
        base = ROOT / package_dir.get(top, top)
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if any(part.startswith((".", "__")) for part in rel):
                continue
            found[".".join((top, *rel))] = init.parent
    return found


def test_every_package_folder_is_listed_for_installs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = package_folders(setuptools["package-dir"])
    missing = sorted(set(folders) - listed)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {missing}"
    nowhere = sorted(p for p in listed if p not in folders)
    assert not nowhere, f"listed packages without a folder holding __init__.py: {nowhere}"
