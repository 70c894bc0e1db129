"""speechllm.precision: bf16 only where it measures faster. Run: python -m pytest -q tests/test_precision.py"""
import pytest
import torch

from speechllm import precision


@pytest.fixture(autouse=True)
def fresh_probe():
    precision._cpu_bf16_is_fast.cache_clear()
    yield
    precision._cpu_bf16_is_fast.cache_clear()


def fake_rates(monkeypatch, native: bool, fp32: float, bf16: float) -> list:
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)

    def rate(dtype, *args, **kwargs):
        calls.append(dtype)
        return fp32 if dtype == torch.float32 else bf16
    monkeypatch.setattr(precision, "matmul_gflops", rate)
    return calls


@pytest.mark.parametrize("native, fp32, bf16, expected", [
    (False, 200.0, 900.0, torch.float32),  # no native bf16: never timed, never chosen
    (True, 200.0, 0.7, torch.float32),  # the AVX2-only CPU of the new-user report
    (True, 200.0, 230.0, torch.float32),  # faster, but within the 1.2x margin
    (True, 200.0, 400.0, torch.bfloat16),
])
def test_cpu_rule(monkeypatch, native, fp32, bf16, expected):
    calls = fake_rates(monkeypatch, native, fp32, bf16)
    assert precision.fast_dtype("cpu") == expected
    assert precision.fast_dtype(torch.device("cpu")) == expected
    assert len(calls) == (2 if native else 0)  # measured once per process, not per call


def test_matmul_rate_is_a_rate():
    fast = precision.matmul_gflops(torch.float32, 256, 256, 256, runs=3)
    assert 0.1 < fast < 1e5  # GFLOP/s, not seconds or FLOP/s
