"""CPU check of the cuSPARSELt metadata formula against the probe's measured map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).resolve().parents[2] / "shared" / "notes" / "cslt_layout_probe.json"


@pytest.mark.skipif(not PROBE.exists(), reason="probe map not beside the checkout")
def test_formula_matches_probe_map():
    pytest.importorskip("triton")
    from vllm_sparse24.kernels.cuda.layout import meta_byte_offset, meta_nibble_shift

    for rec in json.loads(PROBE.read_text()):
        if rec["dtype"] != "torch.int8":
            continue
        n, k = rec["N"], rec["K"]
        for key, v in rec["mapping"].items():
            row, group = map(int, key.split(","))
            ((byte, bits),) = v["bytes"]
            r, g = torch.tensor(row), torch.tensor(group)
            assert int(meta_byte_offset(r, g, n, k)) == byte, key
            # the probe flips kept (0,1) -> (2,3): nibble 0b0100 -> 0b1110
            assert bits == 0b1010 << int(meta_nibble_shift(g)), key
