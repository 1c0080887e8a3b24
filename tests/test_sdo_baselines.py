"""The baselines SDO is compared with: ``full`` (exact backprop) with and without activation
checkpointing gives the same gradient; without it no call is recomputed."""
from __future__ import annotations

import pytest
import torch

from shortcut_kernels import sdo
from shortcut_kernels.sdo import chain as sdo_chain

from test_sdo_chain import Tiny, scheduler


@pytest.mark.parametrize("policy", ["full", "draft:2", "alignprop"])
def test_baselines_without_checkpointing_give_the_same_gradient_and_recompute_nothing(policy, monkeypatch):
    torch.manual_seed(0)
    model = Tiny(pair=True)
    sched, _ = scheduler("ddim")
    x_T = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    calls = []
    real = sdo_chain.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdo_chain, "checkpoint", counting)
    grads = {}
    for ckpt in (True, False):
        calls.clear()
        x = x_T.clone().requires_grad_(True)
        config = sdo.ChainConfig(policy=policy, guidance=2.5, checkpoint=ckpt)
        out = sdo.shortcut_sample(model, sched, x, config, generator=torch.Generator().manual_seed(4))
        out.square().sum().backward()
        grads[ckpt] = x.grad
        assert (len(calls) > 0) == ckpt
    torch.testing.assert_close(grads[False], grads[True], rtol=1e-10, atol=1e-12)
    assert grads[True].abs().sum() > 0
