"""sparse24 tensor layout: pack/unpack round trip, bit order, and rejection of bad input."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.utils import unpack_bitmasks

from vllm_sparse24.format import Sparse24FormatError, is_24, mask_24, pack_24, unpack_24


def random_24(n: int, k: int, dtype=torch.int8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g).to(dtype)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return torch.where(mask, w, torch.zeros_like(w))


@pytest.mark.parametrize("n,k", [(1, 8), (7, 64), (64, 576), (130, 1536)])
def test_round_trip(n, k):
    w = random_24(n, k, seed=n + k)
    values, bitmask = pack_24(w)
    assert values.shape == (n, k // 2) and values.dtype == torch.int8
    assert bitmask.shape == (n, k // 8) and bitmask.dtype == torch.uint8
    assert torch.equal(unpack_24(values, bitmask, k), w)


def test_values_in_row_order_and_bitmask_matches_compressed_tensors():
    w = random_24(16, 64, seed=3)
    w[0, :4] = torch.tensor([0, 5, 0, -7], dtype=torch.int8)
    values, bitmask = pack_24(w)
    assert values[0, :2].tolist() == [5, -7]
    # little bit order, as compressed-tensors packs and unpacks it
    assert torch.equal(unpack_bitmasks(bitmask, [16, 64]), mask_24(w))
    assert bitmask[0, 0].item() & 0b1111 == 0b1010


def test_groups_with_fewer_nonzeros_still_keep_exactly_two():
    w = torch.zeros(2, 8, dtype=torch.int8)
    w[0, 3] = 9  # one non-zero: kept with the first zero of its group
    values, bitmask = pack_24(w)
    mask = mask_24(w)
    assert mask.reshape(2, 2, 4).sum(-1).eq(2).all()
    assert mask[0, :4].tolist() == [True, False, False, True]
    assert torch.equal(unpack_24(values, bitmask, 8), w)


def test_pack_rejects_non_24_weight_naming_row_and_columns():
    w = random_24(8, 64)
    w[3, 8:12] = torch.tensor([1, 2, 3, 0], dtype=torch.int8)
    assert not is_24(w)
    with pytest.raises(Sparse24FormatError, match=r"layers.0.q_proj.*row 3, columns 8..11 hold 3 non-zeros"):
        pack_24(w, name="layers.0.q_proj")


@pytest.mark.parametrize("k", [4, 12, 100])
def test_pack_rejects_k_not_multiple_of_8(k):
    with pytest.raises(Sparse24FormatError, match="multiple of 8"):
        pack_24(torch.zeros(2, k, dtype=torch.int8))


def test_unpack_rejects_corrupt_bitmask_and_shape_mismatch():
    values, bitmask = pack_24(random_24(4, 32))
    bad = bitmask.clone()
    bad[2, 1] ^= 0b10000  # row 2, columns 12..15
    with pytest.raises(Sparse24FormatError, match=r"x: bitmask row 2, columns 12..15 has [13] bits set"):
        unpack_24(values, bad, 32, name="x")
    with pytest.raises(Sparse24FormatError, match="shapes disagree"):
        unpack_24(values[:, :-2], bitmask, 32)
    with pytest.raises(Sparse24FormatError, match="uint8"):
        unpack_24(values, bitmask.to(torch.int8), 32)
