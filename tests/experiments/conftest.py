"""Fixtures of the experiments tests: the models tests' tiny corpus and config helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The drivers run the example model, so their tests build its tiny configs (models_testing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from models_testing import write_corpus  # noqa: E402


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder of 12 small text files."""
    folder = tmp_path / "corpus"
    write_corpus(folder)
    return folder
