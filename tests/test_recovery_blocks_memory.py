"""benchmarks/recovery_blocks_memory.py: its CPU smoke run on the tiny shape (the layer times of
every trained layer, the JSON) and the straight-line estimate of the full depth's peak memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("recovery_blocks_memory", REPO / "benchmarks" / "recovery_blocks_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_on_the_tiny_shape(tmp_path):
    bm = _module()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        doc = bm.main(["--shape", "tiny", "--layers", "1", "2", "--steps", "2", "--block-pool-tokens", "2048",
                       "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    (path,) = tmp_path.glob("recovery-blocks-memory-tiny-cpu-*.json")
    assert json.loads(path.read_text()) == doc and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert [len(r["layer_seconds"]) for r in doc["measured"]] == [1, 2]
    # a pool of 2048 tokens is 4 sequences of 512: raised to one batch of 16
    assert all(r["steps_per_layer"] == 2 and r["pool_sequences"] == 16 for r in doc["measured"])
    assert doc["full_depth"] is None  # no GPU memory figures on a CPU


def test_full_depth_is_a_straight_line_through_the_measured_counts():
    bm = _module()
    rows = [{"layers": 2, "peak_gpu_memory_gib": 30.0, "median_layer_seconds": 4.0},
            {"layers": 4, "peak_gpu_memory_gib": 35.0, "median_layer_seconds": 6.0}]
    est = bm.extrapolate(rows, 32)
    assert est["estimate"] and est["per_layer_gib"] == 2.5 and est["fixed_gib"] == 25.0
    assert est["peak_gpu_memory_gib"] == pytest.approx(25 + 2.5 * 32) and est["seconds_all_layers"] == 32 * 5.0
    assert bm.extrapolate(rows[:1], 32) is None
