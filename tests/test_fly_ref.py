"""The fly two-bmm baseline of the bench computes deftly's rank-1 Monarch product (same factors, same FLOPs)."""

from __future__ import annotations

import pytest
import torch

import deftly
from deftly.bench import fly_ref
from deftly.bench.peers import PEERS


@pytest.mark.parametrize(("n_in", "n_out", "k"), [(16, 16, 4), (64, 64, 8), (16, 48, 4)])
def test_equals_deftly_monarch(n_in, n_out, k):
    torch.manual_seed(0)
    layer = deftly.make("monarch", n_in, n_out, nblocks=k, out_blocks=k, rank=1, dtype=torch.float64)
    fly = fly_ref.FlyMonarch(n_in, n_out, nblocks=k, out_blocks=k, dtype=torch.float64)
    with torch.no_grad():
        fly.w1.copy_(layer.R)  # (k, l*r, p) = (k, q, p) with q = l
        fly.w2.copy_(layer.L)  # (l, s, k*r) = (l, s, r_fly) with r_fly = k
        fly.bias.copy_(layer.bias)
    x = torch.randn(5, n_in, dtype=torch.float64)
    torch.testing.assert_close(fly(x), layer(x), rtol=0, atol=1e-12)
    assert fly.flops(5) == layer.flops(5)
    # against the dense matrix built independently from the definition: W[s'*l + j, i*p + p'] =
    # w2[j, s', i] * w1[i, j, p'] (block j of the second factor reads feature j of every input block i)
    w1, w2 = fly.w1.detach(), fly.w2.detach()
    p, s = n_in // k, n_out // k
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(k):
        for i in range(k):
            for sp in range(s):
                W[sp * k + j, i * p:(i + 1) * p] = w2[j, sp, i] * w1[i, j]
    torch.testing.assert_close(fly_ref.fly_monarch_multiply(x, w1, w2), x @ W.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.to_dense().detach(), W, rtol=0, atol=1e-12)


def test_backward_and_peer_row():
    fly = PEERS["fly.monarch"](64, 64, torch.float32)
    assert fly.hparams() == {"nblocks": 8, "out_blocks": 8, "rank": 1}
    x = torch.randn(3, 64, requires_grad=True)
    fly(x).sum().backward()
    assert x.grad is not None and fly.w1.grad is not None and fly.w2.grad is not None
    with pytest.raises(ValueError, match="nblocks"):
        PEERS["fly.monarch"](10, 10, torch.float32)  # 3 blocks do not divide 10
    with pytest.raises(ValueError, match="k\\*p = n"):
        fly_ref.fly_monarch_multiply(torch.randn(2, 10), torch.randn(3, 3, 3), torch.randn(3, 3, 3))
