"""Shared test helpers. Run the suite with: python -m pytest -q tests"""
import os
from pathlib import Path

import pytest
import torch

# Upstream reference outputs live beside the checkout, read-only: ../shared/fixtures.
FIXTURES = Path(os.environ.get("SPEECHLLM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The upstream fixtures' folder. They may not be copied into this repository (their README
    says so), so a clone without them skips the parity tests with this one reason; CI (CI=true)
    has them, and fails instead of skipping."""
    if not FIXTURES.is_dir():
        message = (f"upstream fixtures not found at {FIXTURES}: put the shared fixtures folder beside "
                   f"the checkout (../shared/fixtures) or set SPEECHLLM_FIXTURES")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
