"""Shared test helpers. Run the suite with: python -m pytest -q tests"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

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


def load_script(name: str):
    """A top-level script (infer, convert_weights, train) as a module, so that tests call its
    main(argv) in this process instead of paying for a new interpreter and torch import."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
