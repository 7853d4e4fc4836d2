"""Shared test fixtures: where the real Photoshop files live."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "psd-fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    """``../shared/psd-fixtures``; tests using it skip cleanly where it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(
            "the real Photoshop test files are not present: they are read from "
            f"{FIXTURES} (the project's shared folder, beside this clone)"
        )
    return FIXTURES
