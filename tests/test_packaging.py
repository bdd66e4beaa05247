"""The clone a newcomer gets: the README stands alone, pyproject's metadata is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def test_readme_stands_alone_in_a_clone():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not target.startswith(("http", "/", "..")), f"README links outside the repository: {target}"
        path = target.split("#")[0]
        assert not path or (ROOT / path).exists(), f"README links a missing file: {target}"
    assert "huggingface-cli" not in text and "hf download" in text


def test_pyproject_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
