"""`.typecheck/lstmserve` mirrors the installed package with links, so that mypy checks imports of
lstmserve.server, .client, .bench and .export (it cannot follow setuptools' package-dir): every entry of
lstmserve/ and every package-dir folder has its link there, and nothing else does."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = ROOT / ".typecheck" / "lstmserve"


def expected_links() -> dict[str, Path]:
    """Name in the mirror -> what it must point at: lstmserve/'s own entries, then each mapped subpackage."""
    expected = {p.name: p for p in (ROOT / "lstmserve").iterdir() if p.name != "__pycache__"}
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        if package != "lstmserve":
            expected[package.removeprefix("lstmserve.")] = ROOT / folder
    return expected


def test_the_typecheck_mirror_links_every_part_of_the_package_and_nothing_else() -> None:
    links = {p.name: p for p in MIRROR.iterdir()}
    assert all(p.is_symlink() for p in links.values()), "the mirror holds links only"
    assert {name: p.resolve() for name, p in links.items()} == {
        name: p.resolve() for name, p in expected_links().items()
    }


def test_mypy_checks_the_package_through_the_mirror() -> None:
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["mypy_path"] == ".typecheck" and ".typecheck/lstmserve" in mypy["files"]
