"""Shared test helpers. Run the suite with: python -m pytest -q tests"""
import os
from pathlib import Path

import pytest
import torch

# Upstream reference outputs live beside the checkout, read-only: ../shared/fixtures.
FIXTURES = Path(os.environ.get("SPEECHLLM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


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
