"""The sparse24 tensor layout: 2:4 values + bitmask, pure torch (no vLLM import).

A 2:4 weight W [N, K] (K a multiple of 8) is stored as
  * ``values``  [N, K/2]: the two kept values of every group of 4 along K, in row order;
  * ``bitmask`` uint8 [N, K/8]: one bit per dense element, set where the value is kept,
    little bit order (``compressed_tensors.utils.pack_bitmasks``). Every group of 4 has
    exactly two bits set; a kept value may itself be 0.

Values of any dtype: int8, or float8_e4m3fn (the fp8 scheme). 8-bit floats are moved as their
bytes (uint8 views), which every device supports, and a value counts as zero when it is +0 or -0.

The w4a8 scheme stores the same kept values as int4, two to a byte (``pack_int4_24``):
  * ``values`` uint8 [N, K/4]: byte b of a row holds kept values 2b (low nibble) and 2b + 1 (high
    nibble), i.e. the kept pair of the group of 4 at columns 4b..4b+3, the lower column's value in
    the low nibble; two's complement nibbles in [-7, 7] (0x8 is refused);
  * the same ``bitmask``;
  * ``group_scale`` uint8 [N, ceil(K/128)]: g in [1, 18] for columns 128j..128j+127 (bitmask bytes
    16j..16j+15, values bytes 32j..32j+31); int8 code = int4 value x g.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import pack_bitmasks

from .quant import GROUP_SCALE_MAX, GROUP_SIZE, INT4_MAX, expand_group_scale, group_count

GROUP = 4
KEEP = 2


class Sparse24FormatError(ValueError):
    """A tensor does not follow the sparse24 layout."""


def _check_k(k: int, name: str) -> None:
    if k % 8 != 0:
        raise Sparse24FormatError(
            f"{name}: input dimension K={k} must be a multiple of 8 "
            "(groups of 4 along K, and whole bitmask bytes)"
        )


# 8-bit floats whose only zeros are +0 (0x00) and -0 (0x80)
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _is_float8(t: torch.Tensor) -> bool:
    return t.dtype in _FLOAT8


def nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    """bool, True where the value is not 0 (8-bit floats by their bits: +0 and -0 are 0)."""
    if _is_float8(weight):
        return (weight.view(torch.uint8) & 0x7F) != 0
    return weight != 0


def _take(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """weight[mask] as [n, -1], 8-bit floats moved as bytes."""
    if _is_float8(weight):
        return weight.view(torch.uint8)[mask].reshape(n, -1).view(weight.dtype)
    return weight[mask].reshape(n, -1)


def first_bad_group(mask: torch.Tensor) -> tuple[int, int] | None:
    """(row, group) of the first group of 4 whose kept count is not 2, or None."""
    counts = mask.reshape(mask.shape[0], -1, GROUP).sum(-1)
    bad = (counts != KEEP).nonzero()
    if bad.numel() == 0:
        return None
    return int(bad[0, 0]), int(bad[0, 1])


def is_24(weight: torch.Tensor) -> bool:
    """True if at most 2 of every 4 consecutive values along the last dim are non-zero."""
    if weight.shape[-1] % GROUP:
        return False
    nz = nonzero_mask(weight).reshape(*weight.shape[:-1], -1, GROUP).sum(-1)
    return bool((nz <= KEEP).all())


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """The kept-position mask of a 2:4 weight: its non-zeros, padded with the first zeros
    of each group so that every group keeps exactly two positions."""
    n, k = weight.shape
    g = weight.reshape(n, k // GROUP, GROUP)
    pos = torch.arange(GROUP, device=weight.device)
    # non-zeros first, then the lowest positions; ties are impossible (distinct keys)
    key = nonzero_mask(g).to(torch.int32) * GROUP + (GROUP - 1 - pos)
    keep = key.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(n, k)


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`Sparse24FormatError` naming ``name``, the first bad row and columns unless
    the 2-D ``weight`` has at most 2 non-zeros in every group of 4 along K."""
    if weight.dim() != 2:
        raise Sparse24FormatError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    _check_k(k, name)
    nz = nonzero_mask(weight).reshape(n, k // GROUP, GROUP).sum(-1)
    bad = (nz > KEEP).nonzero()
    if bad.numel():
        r, g = int(bad[0, 0]), int(bad[0, 1])
        raise Sparse24FormatError(
            f"{name}: not 2:4 sparse: row {r}, columns {g * GROUP}..{g * GROUP + 3} hold "
            f"{int(nz[r, g])} non-zeros (at most 2 of every 4 along K are allowed); "
            f"{bad.shape[0]} such groups in all"
        )


def pack_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 weight [N, K] into (values [N, K/2], bitmask uint8 [N, K/8])."""
    check_24(weight, name)
    n = weight.shape[0]
    mask = mask_24(weight)
    values = _take(weight, mask, n)
    bitmask = pack_bitmasks(mask.cpu()).to(weight.device)
    return values, bitmask


def unpack_bitmask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] little-order bits -> bool [N, K] (works on any device)."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :k].bool()


def check_24_mask(mask: torch.Tensor, name: str) -> None:
    bad = first_bad_group(mask)
    if bad is not None:
        r, g = bad
        n_set = int(mask[r, g * GROUP : (g + 1) * GROUP].sum())
        raise Sparse24FormatError(
            f"{name}: bitmask row {r}, columns {g * GROUP}..{g * GROUP + 3} has {n_set} bits set; "
            "every group of 4 must have exactly 2 (corrupt checkpoint or not 2:4)"
        )


def unpack_24(
    values: torch.Tensor, bitmask: torch.Tensor, k: int | None = None, name: str = "weight"
) -> torch.Tensor:
    """Inverse of :func:`pack_24`: (values [N, K/2], bitmask [N, K/8]) -> dense [N, K].

    Checks that shapes agree and that every group of 4 keeps exactly 2 values.
    """
    return unpack_24_with_mask(values, bitmask, k, name)[0]


def unpack_24_with_mask(
    values: torch.Tensor, bitmask: torch.Tensor, k: int | None = None, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`unpack_24` and the kept positions it read (bool [N, K], exactly 2 of every 4; a kept
    value may be 0, so the mask is not the dense weight's non-zeros)."""
    if values.dim() != 2 or bitmask.dim() != 2:
        raise Sparse24FormatError(
            f"{name}: values and bitmask must be 2-D, got {tuple(values.shape)} and {tuple(bitmask.shape)}"
        )
    n, half_k = values.shape
    k = 2 * half_k if k is None else k
    _check_k(k, name)
    if half_k * 2 != k or tuple(bitmask.shape) != (n, (k + 7) // 8):
        raise Sparse24FormatError(
            f"{name}: shapes disagree: values {tuple(values.shape)} and bitmask "
            f"{tuple(bitmask.shape)} for K={k}; expected values [N, K/2] and bitmask uint8 [N, K/8]"
        )
    if bitmask.dtype != torch.uint8:
        raise Sparse24FormatError(f"{name}: bitmask must be uint8, got {bitmask.dtype}")
    mask = unpack_bitmask(bitmask, k)
    check_24_mask(mask, name)
    if _is_float8(values):
        dense = torch.zeros(n, k, dtype=torch.uint8, device=values.device)
        dense[mask] = values.view(torch.uint8).reshape(-1)
        return dense.view(values.dtype), mask
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense, mask


def pack_24_with_mask(
    weight: torch.Tensor, mask: torch.Tensor, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`pack_24`, but with the kept positions given: the bitmask written is ``mask``
    bit for bit even where a kept value is 0 (``pack_24`` would choose the padding positions
    itself). ``weight`` must be 0 wherever ``mask`` is False."""
    if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
        raise Sparse24FormatError(
            f"{name}: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be the same 2-D shape"
        )
    n, k = weight.shape
    _check_k(k, name)
    mask = mask.bool()
    check_24_mask(mask, name)
    outside = nonzero_mask(weight) & ~mask
    if bool(outside.any()):
        r, c = (int(v) for v in outside.nonzero()[0])
        raise Sparse24FormatError(
            f"{name}: non-zero value at row {r}, column {c} where the 2:4 mask is 0 "
            f"({int(outside.sum())} such values in all)"
        )
    values = _take(weight, mask, n)
    bitmask = pack_bitmasks(mask.cpu()).to(weight.device)
    return values, bitmask


# -- w4a8: int4 kept values, two to a byte, and the group scales --------------------------------


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int8 [N, M] (M even, each in [-8, 7]) -> uint8 [N, M/2]: values 2b and 2b + 1 in the low and
    high nibble of byte b, two's complement."""
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B] -> int8 [N, 2B], the inverse of :func:`pack_nibbles` (sign-extended)."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int16)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def check_group_scale(group_scale: torch.Tensor, n: int, k: int, name: str) -> None:
    """Raise :class:`Sparse24FormatError` naming ``name``, the first bad row and its columns unless
    ``group_scale`` is uint8 [N, ceil(K/128)] with every entry in [1, 18]."""
    want = (n, group_count(k))
    if group_scale.dtype != torch.uint8 or tuple(group_scale.shape) != want:
        raise Sparse24FormatError(
            f"{name}: expected uint8 group scales {list(want)} (one per row and {GROUP_SIZE} columns of K={k}), "
            f"got {group_scale.dtype} {list(group_scale.shape)}"
        )
    bad = ((group_scale < 1) | (group_scale > GROUP_SCALE_MAX)).nonzero()
    if bad.numel():
        r, j = int(bad[0, 0]), int(bad[0, 1])
        raise Sparse24FormatError(
            f"{name}: row {r}, columns {j * GROUP_SIZE}..{min((j + 1) * GROUP_SIZE, k) - 1} have group scale "
            f"{int(group_scale[r, j])}; expected 1..{GROUP_SCALE_MAX} (int4 value x group scale must be an int8 "
            f"code within +-{INT4_MAX * GROUP_SCALE_MAX}); {bad.shape[0]} such groups in all"
        )


def pack_int4_24(values: torch.Tensor, mask: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values [N, K] (int8 in [-7, 7], 0 outside ``mask``) and the kept positions (bool [N, K],
    exactly 2 of every 4) -> (values uint8 [N, K/4], bitmask uint8 [N, K/8])."""
    outside = (values < -INT4_MAX) | (values > INT4_MAX)
    if bool(outside.any()):
        r, c = (int(v) for v in outside.nonzero()[0])
        raise Sparse24FormatError(f"{name}: int4 value {int(values[r, c])} at row {r}, column {c} is outside "
                                  f"[-{INT4_MAX}, {INT4_MAX}]")
    kept, bitmask = pack_24_with_mask(values.to(torch.int8), mask, name)
    return pack_nibbles(kept), bitmask


def unpack_int4_24(packed: torch.Tensor, bitmask: torch.Tensor, k: int | None = None,
                   name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_int4_24`: (values uint8 [N, K/4], bitmask [N, K/8]) -> (int4 values
    int8 [N, K], 0 outside the mask; the mask bool [N, K]). Checks the shapes, that every group of 4
    keeps exactly 2 values and that no nibble is 0x8 (-8)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise Sparse24FormatError(f"{name}: int4 values must be uint8 [N, K/4], got {packed.dtype} "
                                  f"{list(packed.shape)}")
    n, quarter_k = packed.shape
    k = 4 * quarter_k if k is None else k
    if 4 * quarter_k != k:
        raise Sparse24FormatError(f"{name}: int4 values {list(packed.shape)} for K={k}; expected [N, K/4] "
                                  "(two int4 values per byte, two kept of every 4)")
    kept = unpack_nibbles(packed)
    minus8 = (kept == -8).nonzero()
    if minus8.numel():
        r, j = int(minus8[0, 0]), int(minus8[0, 1])
        raise Sparse24FormatError(
            f"{name}: row {r}, byte {j // 2} ({'high' if j % 2 else 'low'} nibble, columns {4 * (j // 2)}.."
            f"{4 * (j // 2) + 3}) holds 0x8 (-8); int4 values are in [-{INT4_MAX}, {INT4_MAX}]; "
            f"{minus8.shape[0]} such nibbles in all"
        )
    return unpack_24_with_mask(kept, bitmask, k, name)


def int4_to_int8(values: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] = int4 values [N, K] x their group's scale (exact: |v x g| <= 126)."""
    g = expand_group_scale(group_scale, values.shape[1]).to(torch.int16)
    return (values.to(torch.int16) * g).to(torch.int8)
