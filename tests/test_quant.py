from __future__ import annotations

import torch

from vllm_sparse24.quant import (
    fake_quant_per_token,
    quantize_per_token,
    quantize_weight_per_channel,
)


def test_weight_per_channel_grid_and_error():
    w = torch.randn(64, 256, dtype=torch.float64)
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (64, 1)
    assert q.abs().amax(1).eq(127).all()  # the row max lands on the grid end
    err = (q.double() * s - w).abs().max(1).values
    assert (err <= s.squeeze(1) / 2 + 1e-9).all()  # round to nearest: at most half a step


def test_per_token_matches_float64_definition():
    x = torch.randn(5, 3, 64)
    x[1, 2] = 0  # an all-zero token must give zeros, not NaN
    q, s = quantize_per_token(x)
    ref_s = x.double().abs().amax(-1, keepdim=True) / 127
    mask = ref_s > 0
    assert torch.allclose(s.double()[mask], ref_s[mask], rtol=1e-6)
    assert torch.equal(q[1, 2], torch.zeros(64, dtype=torch.int8))
    fq = fake_quant_per_token(x)
    assert torch.isfinite(fq).all()
    assert ((fq - x).abs() <= s / 2 + 1e-6).all()
