"""make_optimizer: the optimizer training uses (fused Adam/AdamW where torch has it)."""

from __future__ import annotations

import pytest
import torch

from dao.train import make_optimizer


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_on_cpu_and_same_update(name):
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5).double()
    b = torch.nn.Linear(7, 5).double()
    b.load_state_dict(a.state_dict())
    fast = make_optimizer(a.parameters(), name, lr=1e-2, weight_decay=0.01)
    plain = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](
        b.parameters(), lr=1e-2, weight_decay=0.01
    )
    assert fast.defaults.get("fused") is True
    x = torch.randn(11, 7, dtype=torch.float64)
    for _ in range(5):
        for m, opt in ((a, fast), (b, plain)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_unknown_name_and_fallback():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'adamw'"):
        make_optimizer([p], "sgd", lr=1e-3)
    # No fused kernel for the meta device: the default implementation.
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = make_optimizer([meta], "adamw", lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.defaults.get("fused")
