"""Fixtures of the models tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from models_testing import write_corpus


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder of 12 small text files."""
    folder = tmp_path / "corpus"
    write_corpus(folder)
    return folder
