"""Tensor-parallel loading: rank slices of the packed tensors rebuild the full layer."""

from __future__ import annotations

import pytest
import torch
from test_format import random_24

from vllm_sparse24.format import pack_24, unpack_24


@pytest.fixture()
def tp(monkeypatch):
    import vllm.model_executor.parameter as P

    state = {"rank": 0, "size": 1}
    monkeypatch.setattr(P, "get_tensor_model_parallel_rank", lambda: state["rank"])
    monkeypatch.setattr(P, "get_tensor_model_parallel_world_size", lambda: state["size"])
    return state


def _packed(shape, factor, dtype):
    from vllm.model_executor.parameter import PackedvLLMParameter

    return PackedvLLMParameter(
        data=torch.empty(shape, dtype=dtype), input_dim=1, output_dim=0, packed_dim=1,
        packed_factor=factor, weight_loader=lambda *a: None,
    )


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_row_parallel_slices(tp, size, dtype):
    n, k = 96, 1024
    w = random_24(n, k, seed=size).to(dtype)
    values, bitmask = pack_24(w)
    x = torch.randint(-5, 6, (3, k)).double()
    partial = torch.zeros(3, n, dtype=torch.float64)
    for rank in range(size):
        tp.update(rank=rank, size=size)
        kr = k // size
        v, b = _packed((n, kr // 2), 2, dtype), _packed((n, kr // 8), 8, torch.uint8)
        v.load_row_parallel_weight(values)
        b.load_row_parallel_weight(bitmask)
        shard = unpack_24(v.data, b.data, kr)
        # compared as raw bytes: torch.equal has no float8 kernel on the CPU
        assert torch.equal(shard.view(torch.uint8), w[:, rank * kr : (rank + 1) * kr].view(torch.uint8))
        partial += x[:, rank * kr : (rank + 1) * kr] @ shard.double().t()
    assert torch.equal(partial, x @ w.double().t())  # the all-reduce of the rank outputs


@pytest.mark.parametrize("size", [2, 4])
def test_merged_column_parallel_slices(tp, size):
    from vllm.model_executor.parameter import ChannelQuantScaleParameter

    inter, k = 128, 256
    gate, up = random_24(inter, k, seed=1), random_24(inter, k, seed=2)
    s_gate, s_up = torch.rand(inter, 1), torch.rand(inter, 1)
    for rank in range(size):
        tp.update(rank=rank, size=size)
        per = inter // size
        v, b = _packed((2 * per, k // 2), 2, torch.int8), _packed((2 * per, k // 8), 8, torch.uint8)
        s = ChannelQuantScaleParameter(data=torch.empty(2 * per, 1), output_dim=0, weight_loader=lambda *a: None)
        for i, (w, sc) in enumerate([(gate, s_gate), (up, s_up)]):
            values, bitmask = pack_24(w)
            for p, t in ((v, values), (b, bitmask), (s, sc)):
                p.load_merged_column_weight(t, shard_offset=i * per, shard_size=per)
        rows = slice(rank * per, (rank + 1) * per)
        assert torch.equal(unpack_24(v.data, b.data, k), torch.cat([gate[rows], up[rows]]))
        assert torch.equal(s.data, torch.cat([s_gate[rows], s_up[rows]]))


def test_k_per_rank_must_be_a_multiple_of_64():
    from vllm_sparse24.format import Sparse24FormatError
    from vllm_sparse24.linear_method import Sparse24LinearMethod
    from vllm_sparse24.schema import Sparse24Scheme

    method = Sparse24LinearMethod(Sparse24Scheme(), "model.layers.0.mlp.down_proj", "sparse")
    with pytest.raises(Sparse24FormatError, match=r"down_proj: K per tensor-parallel rank is 96 \(K=384, tp=4\)"):
        method.create_weights(torch.nn.Module(), 96, [64], 384, 64, torch.float32, weight_loader=lambda *a: None)
