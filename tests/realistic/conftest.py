"""Fixtures: the three model families, each built once per session, and their data files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from realistic.families import FAMILIES, Family, FamilyData, build_family, write_family_data


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory) -> Callable[[str], Family]:
    """family_dir(name) -> the Family, built into a session tmp dir on first use and reused afterwards."""
    built: dict[str, Family] = {}
    root = tmp_path_factory.mktemp("families")

    def get(name: str) -> Family:
        if name not in built:
            built[name] = build_family(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, family_dir) -> Family:
    """Each of qwen2, llama3 and gpt2 in turn."""
    return family_dir(request.param)


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> Callable[[Family], FamilyData]:
    """family_data(family) -> its data files (written once per family)."""
    written: dict[str, FamilyData] = {}
    root = tmp_path_factory.mktemp("family-data")

    def get(family: Family) -> FamilyData:
        if family.name not in written:
            written[family.name] = write_family_data(family, Path(root) / family.name)
        return written[family.name]

    return get
