"""The runtime's NaN/inf check of cached tensors (``runtime.cache._all_finite``): a sum first,
elementwise only when the sum is not finite; it must agree with ``isfinite(t).all()``."""
import random

import pytest
import torch

from shortcut_kernels.runtime.cache import _all_finite

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf"), "both"])
def test_agrees_with_isfinite_all(dtype, bad, fresh_seed):
    rng = random.Random(fresh_seed)
    g = torch.Generator().manual_seed(fresh_seed)
    shape = (rng.randint(1, 5), rng.randint(1, 300))
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-3, 3)).to(dtype)
    n = t.numel()
    if bad == "both":  # +inf and -inf: their sum is NaN
        t.view(-1)[rng.randrange(n)] = float("inf")
        t.view(-1)[rng.randrange(n)] = -float("inf")
    elif bad is not None:
        t.view(-1)[rng.randrange(n)] = bad
    assert _all_finite(t) == bool(torch.isfinite(t).all())
    assert _all_finite(t) == (bad is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_values_whose_sum_overflows_are_finite(dtype, fresh_seed):
    rng = random.Random(fresh_seed)
    big = torch.finfo(dtype).max
    t = torch.full((rng.randint(64, 512),), big, dtype=dtype)
    assert not bool(torch.isfinite(t.sum()))  # the sum in its own dtype alone would say "not finite"
    assert _all_finite(t) and _all_finite(-t)
    t[rng.randrange(t.numel())] = float("nan")
    assert not _all_finite(t)


def test_integer_tensors_are_finite():
    assert _all_finite(torch.arange(10)) and _all_finite(torch.zeros(3, dtype=torch.bool))
