"""DAPO soft overlong punishment (spec §3.4, §10)."""

import pytest
import torch

from algos import overlong_penalty

TOL = dict(rtol=1e-5, atol=1e-6)


def test_overlong_spec_vector():
    # L_max 20480, L_cache 4096, soft zone (16384, 20480]: R = (16384 − L)/4096.
    #   16000, 16384 -> 0 (at or below the soft start); 17408 -> −1024/4096 = −0.25;
    #   18432 -> −0.5 (spec §10); 20480 -> −1; 20481, 30000 (> L_max) -> −1 (floor, not −1.000244 / −3.3).
    lengths = torch.tensor([16000, 16384, 17408, 18432, 20480, 20481, 30000])
    pen = overlong_penalty(lengths, max_len=20480, cache_len=4096)
    assert pen.dtype == torch.float32
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]), **TOL)


def test_overlong_cache_equals_max_len():
    # Soft zone is all of (0, 10]: L = 5 -> −0.5, L = 0 -> 0.
    pen = overlong_penalty(torch.tensor([0.0, 5.0, 10.0], dtype=torch.float64), max_len=10, cache_len=10)
    assert pen.dtype == torch.float64
    torch.testing.assert_close(pen, torch.tensor([0.0, -0.5, -1.0], dtype=torch.float64), **TOL)


@pytest.mark.parametrize("max_len, cache_len", [(100, 0), (100, -5), (100, 101)])
def test_overlong_rejects_bad_cache(max_len, cache_len):
    with pytest.raises(ValueError, match="need 0 < cache_len <= max_len"):
        overlong_penalty(torch.tensor([1]), max_len=max_len, cache_len=cache_len)
