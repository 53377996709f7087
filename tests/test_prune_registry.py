"""Pruning methods are a registry: a method defined and registered in this test module (as a new
method's own file and its one ``register`` line would) runs through ``compress``, the command line
and ``compare``'s run list, gets the statistics it declares, and is refused calibration-free use
when it declares any."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparse24_tools import prune  # noqa: E402
from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressError, CompressOptions, comparison_runs  # noqa: E402
from sparse24_tools.group import compress_group  # noqa: E402
from sparse24_tools.prune import Pruned, PruningMethod, Stats  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402
from vllm_sparse24.quant import INT8, quantize_weight_per_channel  # noqa: E402

SEEN: list[tuple[int, ...]] = []  # the shapes of the statistics the statistics-reading toy got


def keep_first_two(weight, hessian, grid, opts, name) -> Pruned:
    """Keeps positions 0 and 1 of every group of 4, whatever the weights."""
    keep = torch.tensor([True, True, False, False]).repeat(weight.shape[1] // 4)
    return Pruned(*quantize_weight_per_channel(weight * keep, grid), "first-two")


def keep_quiet_inputs(weight, hessian, grid, opts, name) -> Pruned:
    """Keeps, in every group of 4, the 2 columns whose inputs have the smallest norms."""
    SEEN.append(tuple(hessian.shape))
    norms = torch.diagonal(hessian).reshape(-1, 4)
    keep = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(2, dim=1, largest=False).indices, True)
    return Pruned(*quantize_weight_per_channel(weight * keep.reshape(-1), grid))


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(prune.METHODS, "toy-first2", PruningMethod(
        "toy-first2", Stats.NONE, "keep positions 0 and 1 of every 4", keep_first_two))
    monkeypatch.setitem(prune.METHODS, "toy-quiet", PruningMethod(
        "toy-quiet", Stats.INPUT_NORMS, "keep the 2 columns of quietest inputs", f"{__name__}:keep_quiet_inputs"))
    SEEN.clear()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    import tiny_llama as tl

    folder = tmp_path_factory.mktemp("registry") / "dense"
    tl.build_dense(folder, hidden=128, intermediate=256, layers=1).save_pretrained(folder)
    calib = folder.parent / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 300))
    return folder, calib


def test_a_registered_method_runs_through_compress(toys, dense, tmp_path):
    folder, _ = dense
    rep = compress(folder, tmp_path / "out", CompressOptions(method="toy-first2", progress=False))
    linears = ckpt.read_checkpoint(tmp_path / "out").linears
    assert len(linears) == 7 and {r["method"] for r in rep["linears"].values()} == {"first-two"}
    for prefix, q in linears.items():
        assert q.kind == "sparse"
        assert q.mask.reshape(q.mask.shape[0], -1, 4)[..., :2].all(), prefix
        assert not q.mask.reshape(q.mask.shape[0], -1, 4)[..., 2:].any(), prefix


def test_a_method_gets_the_statistics_it_declares_and_needs_calibration(toys, dense, tmp_path):
    folder, calib = dense
    with pytest.raises(CompressError, match=r"--method toy-quiet needs calibration data \(norms of each linear's "
                                            r"inputs\).*run without: \['magnitude', 'toy-first2'\]"):
        compress(folder, tmp_path / "a", CompressOptions(method="toy-quiet", progress=False))
    opts = CompressOptions(method="toy-quiet", calib=str(calib), nsamples=2, seqlen=32, progress=False)
    rep = compress(folder, tmp_path / "b", opts)
    # one call per group of linears sharing an input: q/k/v and gate/up see K=128, o 128, down 256
    assert sorted(SEEN) == [(128, 128)] * 3 + [(256, 256)]
    assert rep["method"] == "toy-quiet" and "output error" in rep["errors"]


def test_the_command_line_and_compare_offer_registered_methods(toys, dense, tmp_path):
    from sparse24_tools.__main__ import build_parser, main

    folder, _ = dense
    compress_parser = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices["compress"]
    method = next(a for a in compress_parser._actions if a.dest == "method")
    assert {"toy-first2", "toy-quiet"} <= set(method.choices)
    assert "toy-quiet: keep the 2 columns of quietest inputs [reads the norms of its inputs: needs --calib]" in method.help
    assert {"toy-first2", "toy-quiet"} <= set(comparison_runs())
    assert main(["compress", "--model", str(folder), "--out", str(tmp_path / "c"), "--method", "toy-first2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "c" / "compress_report.json").read_text())["method"] == "toy-first2"


def test_a_method_that_does_not_return_24_codes_is_refused(monkeypatch):
    monkeypatch.setitem(prune.METHODS, "toy-dense", PruningMethod(
        "toy-dense", Stats.NONE, "keeps everything", lambda w, h, g, o, n: Pruned(*quantize_weight_per_channel(w, g))))
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"l0: pruning method toy-dense returned torch.int8 codes \(16, 64\) \(2:4: "
                                         r"False\)"):
        compress_group([("l0", w)], None, kind="sparse", grid=INT8, opts=CompressOptions(method="toy-dense"))
    with pytest.raises(ValueError, match="unknown pruning method 'nope'; choose from"):
        compress_group([("l0", w)], None, kind="sparse", grid=INT8, opts=CompressOptions(method="nope"))
