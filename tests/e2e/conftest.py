"""Fixtures the end-to-end model tests share (tests/e2e/test_llama_models.py,
tests/e2e/test_architectures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.llama_runs import sample_text
from tools.processes import ServerProcess


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """The text llama-perplexity reads (tools.llama_runs.sample_text)."""
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(sample_text())
    return p


@pytest.fixture(scope="module")
def refimpl_server():
    """A refimpl-server process for the module's tests."""
    with ServerProcess("refimpl", args=["--log-level", "warning"]) as srv:
        yield srv
