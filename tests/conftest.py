"""Shared fixtures: one TFDS data dir per test session (the bundled builders are prepared into it once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data dir with the bundled datasets; also exported as $GRADZOO_DATA_DIR."""
    path = str(tmp_path_factory.mktemp("tfds"))
    os.environ["GRADZOO_DATA_DIR"] = path
    return path


@pytest.fixture(scope="session")
def quickstart() -> Path:
    return ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def no_op_determinism():
    """Off for the test: Keras silently drops jit_compile while TF op determinism is on (earlier arms turn it on)."""
    from ablations.compat import op_determinism_enabled
    from ablations.strategy import set_op_determinism

    was = op_determinism_enabled()
    set_op_determinism(False)
    yield
    set_op_determinism(was)
