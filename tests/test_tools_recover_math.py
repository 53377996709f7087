"""Tensor math of ``offline recover``: chunked KL and its gradients, SquareHead, the
straight-through int8 and w4a8 (int4) fake-quant, the fixed-mask linear and mask-preserving
packing (fast, CPU)."""

from __future__ import annotations

import pytest
import torch

from sparse24_tools.distill_data import BatchOrder
from sparse24_tools.distill_loss import chunked_kl, kl_reference, normalized_mse, squarehead_loss
from sparse24_tools.qat import (
    QATLinear,
    ste_fake_quant_int4_weight,
    ste_fake_quant_per_token,
    ste_fake_quant_weight,
)
from sparse24_tools.recover_run import lr_at
from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.format import (
    Sparse24FormatError,
    pack_24,
    pack_24_with_mask,
    unpack_24,
    unpack_int4_24,
)
from vllm_sparse24.quant import (
    GROUP_SIZE,
    INT4_MAX,
    W4A8,
    expand_group_scale,
    fake_quant_per_token,
    quantize_weight_per_channel,
)

# float32 chunked computation vs a float64 full-logits reference
KL_RTOL = 1e-4


def _heads(n=37, h=16, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ht = hs + 0.5 * torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    wt = ws + 0.2 * torch.randn(v, h, generator=g, dtype=torch.float64)
    return hs, ht, ws, wt


@pytest.mark.parametrize("chunk", [7, 64, 300, 1000])
def test_chunked_kl_matches_full_logits_values_and_gradients(chunk):
    hs, ht, ws, wt = _heads()
    ref_hs, ref_ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = kl_reference(ref_hs @ ref_ws.t(), ht @ wt.t())
    (ref * torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64)).sum().backward()

    hs32, ws32 = hs.float().requires_grad_(), ws.float().requires_grad_()
    kl, agree = chunked_kl(hs32, ht.float(), ws32, wt.float(), chunk=chunk)
    (kl * torch.linspace(0.5, 1.5, kl.numel())).sum().backward()
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=KL_RTOL, atol=1e-6)
    torch.testing.assert_close(hs32.grad.double(), ref_hs.grad, rtol=KL_RTOL, atol=1e-5)
    torch.testing.assert_close(ws32.grad.double(), ref_ws.grad, rtol=KL_RTOL, atol=1e-5)
    want = (hs @ ws.t()).argmax(-1) == (ht @ wt.t()).argmax(-1)
    assert torch.equal(agree, want)


def test_chunked_kl_is_zero_for_identical_models_and_checks_shapes():
    hs, _, ws, _ = _heads()
    kl, agree = chunked_kl(hs.float(), hs.float(), ws.float(), ws.float(), chunk=50)
    assert float(kl.abs().max()) < 1e-5 and bool(agree.all())
    with pytest.raises(ValueError, match="output embeddings"):
        chunked_kl(hs.float(), hs.float(), ws.float(), ws[:, :4].float(), chunk=50)


def test_squarehead_and_normalized_mse():
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    s = [x + 0.1 * i * torch.randn_like(x) for i, x in enumerate(t)]
    want = sum(((a - b) ** 2).sum() / (b**2).sum() for a, b in zip(s, t, strict=True)) / 3
    torch.testing.assert_close(squarehead_loss(s, t), want)
    assert float(normalized_mse(t[0], t[0])) == 0.0
    with pytest.raises(ValueError, match="2 student vs 3 teacher"):
        squarehead_loss(s[:2], t)


def test_squarehead_split_over_processes_is_the_whole_batch():
    """Each of two processes holds half the batch and divides by the mean of the halves' ||t||^2
    (``reduce``, as under FSDP): the mean of their losses and of their gradients (what FSDP's
    averaging gives) is the whole batch's loss and gradient."""
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(4, 5, 8, generator=g) * (i + 1) for i in range(3)]
    s = [(x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_() for x in t]
    whole = squarehead_loss(s, t)
    (want,) = torch.autograd.grad(whole, [s[1]])
    halves = [slice(0, 2), slice(2, 4)]
    dens = [torch.stack([x[h].pow(2).sum() for x in t]) for h in halves]
    mean_dens = (dens[0] + dens[1]) / 2
    seen = []

    def mean_over_halves(d: torch.Tensor) -> torch.Tensor:  # what the all-reduce gives each process
        seen.append(d)
        return mean_dens

    losses = [squarehead_loss([x[h] for x in s], [x[h] for x in t], reduce=mean_over_halves) for h in halves]
    assert all(torch.equal(a, b) for a, b in zip(seen, dens, strict=True))
    split = (losses[0] + losses[1]) / 2
    (got,) = torch.autograd.grad(split, [s[1]])
    # float32 sums in another order: a few ulps
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_ste_fake_quant_equals_the_plugin_arithmetic_with_identity_gradient():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 64, generator=g) * torch.logspace(-2, 2, 6)[:, None]).requires_grad_()
    y = ste_fake_quant_per_token(x)
    assert torch.equal(y, fake_quant_per_token(x.detach()))  # bit for bit
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = torch.randn(8, 64, generator=g)
    q, s = quantize_weight_per_channel(w)
    assert torch.equal(ste_fake_quant_weight(w), q.float() * s)


def test_qat_linear_keeps_the_mask_and_exports_its_forward_weights():
    from sparse24_tools.prune.magnitude import magnitude_24

    g = torch.Generator().manual_seed(0)
    w = magnitude_24(torch.randn(16, 64, generator=g))
    mask = w != 0
    lin = QATLinear(w, mask, None, "layer")
    x = torch.randn(5, 64, generator=g)
    lin(x).pow(2).sum().backward()
    assert bool((lin.weight.grad[~mask] == 0).all()) and bool((lin.weight.grad[mask] != 0).any())
    with torch.no_grad():
        lin.weight.add_(0.01)  # touches pruned positions too
    lin.reapply_mask()
    q, s = lin.export()
    assert bool((q[~mask] == 0).all())
    assert torch.equal(lin.effective_weight().detach(), q.float() * s)
    assert torch.equal(lin(x), torch.nn.functional.linear(fake_quant_per_token(x), q.float() * s))


def test_qat_linear_starts_on_the_students_grid():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-60, 61, (8, 64), generator=g, dtype=torch.int8)  # rows never reach 127
    scale = torch.rand(8, 1, generator=g) * 0.01 + 0.001
    lin = QATLinear(q.float() * scale, None, None, "dense", scale_floor=scale)
    q1, s1 = lin.export()
    assert torch.equal(q1, q) and torch.equal(s1, scale)
    with torch.no_grad():
        lin.weight[0, 0] = 200 * scale[0, 0]  # outgrows the grid: that row's scale widens
    q2, s2 = lin.export()
    assert int(q2[0].abs().max()) == 127 and s2[0, 0] > scale[0, 0] and torch.equal(s2[1:], scale[1:])


def test_int4_ste_is_the_two_level_grid_in_float64_and_passes_gradients_inside_the_clamp_range():
    g = torch.Generator().manual_seed(2)
    n, k = 6, 300  # three groups along K, the last one partial
    scale = (torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.01 + 1e-3).float()
    group_scale = torch.randint(1, 19, (n, -(-k // GROUP_SIZE)), generator=g, dtype=torch.uint8)
    step = scale * expand_group_scale(group_scale, k).float()  # the grid's float32 product s x g
    # integer + offset at least 0.1 from a rounding tie, integers past +-7 so the clamp is exercised
    ints = torch.randint(-10, 11, (n, k), generator=g).double()
    frac = (torch.rand(n, k, generator=g, dtype=torch.float64) - 0.5) * 0.8
    w = ((ints + frac) * step.double()).float().requires_grad_()
    y = ste_fake_quant_int4_weight(w, scale, group_scale)
    v64 = torch.round(w.detach().double() / step.double()).clamp(-INT4_MAX, INT4_MAX)
    assert torch.equal(v64, ints.clamp(-INT4_MAX, INT4_MAX))
    want = v64 * expand_group_scale(group_scale, k).double() * scale.double()
    torch.testing.assert_close(y.double(), want, rtol=2**-23, atol=0)  # one float32 rounding of the product
    codes = W4A8.codes(w.detach(), scale, group_scale)  # what the writer stores: int4 value x g
    assert torch.equal(y.detach(), codes.float() * scale)
    upstream = torch.randn(n, k, generator=g)
    (y * upstream).sum().backward()
    inside = ints.abs() <= INT4_MAX
    assert 0 < int(inside.sum()) < n * k
    assert torch.equal(w.grad[inside], upstream[inside])  # straight through
    assert bool((w.grad[~inside] == 0).all())  # held by the clamp: no gradient


def _w4a8_layer(n: int = 16, k: int = 256, seed: int = 0):
    from sparse24_tools.prune.magnitude import magnitude_24

    g = torch.Generator().manual_seed(seed)
    w = magnitude_24(torch.randn(n, k, generator=g))
    mask = w != 0
    codes, scale, group_scale = W4A8.quantize(w)
    return codes, scale, group_scale, mask


def test_w4a8_qat_linear_starts_on_the_students_grid_and_exports_its_forward():
    codes, scale, group_scale, mask = _w4a8_layer()
    lin = QATLinear(codes.float() * scale, mask, None, "layer", scale_floor=scale, group_scale=group_scale)
    q0, s0 = lin.export()
    assert torch.equal(q0, codes) and torch.equal(s0, scale) and torch.equal(lin.export_group_scale(), group_scale)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    lin(x).pow(2).sum().backward()
    assert bool((lin.weight.grad[~mask] == 0).all()) and bool((lin.weight.grad[mask] != 0).any())
    with torch.no_grad():
        # every kept value moves by one or two int4 steps, some past +-7 (held by the clamp)
        lin.weight.add_(lin.weight.grad.sign() * scale * expand_group_scale(group_scale, 256).float() * 1.6)
    lin.reapply_mask()
    q, s = lin.export()
    assert not torch.equal(q, codes) and torch.equal(s, scale)  # the scales are frozen
    assert torch.equal(lin.export_group_scale(), group_scale)
    assert torch.equal(lin.effective_weight().detach(), q.float() * s)
    assert torch.equal(lin(x), torch.nn.functional.linear(fake_quant_per_token(x), q.float() * s))
    # the one writer takes it as a w4a8 layer: the int4 values on the mask, the group scales as given
    t = ckpt.layer_tensors("layer", q, s, sparse=True, mask=mask, group_scale=lin.export_group_scale())
    v, m = unpack_int4_24(t["layer.weight_packed"], t["layer.weight_bitmask"], 256)
    assert torch.equal(m, mask) and int(v.abs().max()) == INT4_MAX
    assert torch.equal(v.to(torch.int16) * expand_group_scale(group_scale, 256).to(torch.int16), q.to(torch.int16))


def test_w4a8_qat_linear_names_bad_group_scales():
    codes, scale, group_scale, mask = _w4a8_layer()
    w = codes.float() * scale
    with pytest.raises(Sparse24FormatError, match=r"layer: group scales: expected uint8 group scales \[16, 2\]"):
        QATLinear(w, mask, None, "layer", scale_floor=scale, group_scale=group_scale[:, :1])
    bad = group_scale.clone()
    bad[3, 1] = 19
    with pytest.raises(Sparse24FormatError, match="layer: group scales: row 3, columns 128..255 have group scale 19"):
        QATLinear(w, mask, None, "layer", scale_floor=scale, group_scale=bad)
    with pytest.raises(ValueError, match="layer: w4a8 group scales need the layer's 2:4 mask"):
        QATLinear(w, None, None, "layer", scale_floor=scale, group_scale=group_scale)


def test_pack_with_mask_keeps_kept_zeros_where_pack_24_would_not():
    w = torch.zeros(2, 8, dtype=torch.int8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, [1, 3, 5, 6]] = True
    w[0, 3], w[0, 5], w[1, 1], w[1, 6] = 4, -2, 7, 1  # kept positions 1 (row 0), 3 (row 1)... hold 0
    values, bitmask = pack_24_with_mask(w, mask)
    assert torch.equal(unpack_24(values, bitmask), w)
    from vllm_sparse24.format import unpack_bitmask

    assert torch.equal(unpack_bitmask(bitmask, 8), mask)
    _, other = pack_24(w)  # chooses its own padding positions: a different mask
    assert not torch.equal(unpack_bitmask(other, 8), mask)
    bad = w.clone()
    bad[0, 0] = 9
    with pytest.raises(Sparse24FormatError, match="row 0, column 0 where the 2:4 mask is 0"):
        pack_24_with_mask(bad, mask, name="layer")


def test_lr_schedule_and_batch_order_are_deterministic():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.01
    a, b = BatchOrder(10, 4, 3), BatchOrder(10, 4, 3)
    seq = [a.batch(s).tolist() for s in range(5)]
    assert seq == [b.batch(s).tolist() for s in reversed(range(5))][::-1]
    flat = sum(seq, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
