"""Shared test helpers. Run the suite with: python -m pytest -q tests"""
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"upstream fixtures not found at {FIXTURES} (expected ../shared/fixtures)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
