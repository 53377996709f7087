"""``vllm-sparse24 recover`` on a tiny random Llama (CPU): the 2:4 mask is kept bit for bit,
the exported values are the trained int8 values, the loss goes down in both modes, an
interrupted run leaves no output and resumes to the same result, bad inputs fail clearly, and
the output runs in the plugin with the log-probs of ``offline eval``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

from sparse24_tools.calib import CalibrationError  # noqa: E402
from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval, perplexity  # noqa: E402
from sparse24_tools.inputs import InputError  # noqa: E402
from sparse24_tools.recover import BudgetError, RecoverError, RecoverOptions, recover  # noqa: E402
from sparse24_tools.recover_budget import MIN_STEPS  # noqa: E402
from sparse24_tools.recover_run import RecoveryRun, warmup_steps  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402
from vllm_sparse24.format import unpack_bitmask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_WORDS = ("the sparse model keeps two of every four weights and quantizes each row to int8 while "
          "the quick brown fox jumps over the lazy dog near the river in the old city").split()
# 40 steps of 8 x 64 tokens; lr 1e-3 is what a tiny random model needs to move in 40 steps; no time
# budget (the steps are the test's), KL only unless a test says otherwise
BASE = {"tokens": 40 * 8 * 64, "seqlen": 64, "batch_size": 8, "lr": 1e-3, "eval_every": 10,
        "eval_windows": 8, "eval_seqlen": 64, "generate_tokens": 600, "gen_prompt_len": 16, "gen_batch_size": 8,
        "loss": "kl", "max_minutes": None, "save_every": 10, "device": "cpu", "progress": False}
# float32 recover evaluation vs float32 offline eval of the written checkpoint (same arithmetic,
# other batch grouping): observed ~1e-7 relative
PPL_RTOL = 1e-4
LOGPROB_ATOL = 1e-3  # plugin engine vs offline eval, as tests/test_offline_engine.py


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: one thread is fastest and immune to a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _text(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (n,), generator=g).tolist()))
    return path


def _save_dense(folder: Path, **kw) -> None:
    import tiny_llama as tl

    model = tl.build_dense(folder, **kw)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    _save_dense(root / "dense", hidden=128, intermediate=256, layers=2)
    calib = _text(root / "calib.txt", 4000, 1)
    ev = _text(root / "eval.txt", 3000, 2)
    # two more texts to evaluate on ("domains"): other words, so the models rank them differently
    (root / "code.txt").write_text("\n".join(f"def f{i}(x):\n    return x * {i} + len(str(x))" for i in range(300)))
    _text(root / "other.txt", 3000, 3)
    student = root / "student"
    compress(root / "dense", student, CompressOptions(method="magnitude", calib=calib, nsamples=6, seqlen=64,
                                                      batch_size=3, dense_layers=(r"model\.layers\.1\.mlp\.down_proj",),
                                                      progress=False))
    # kept positions that hold 0: the bitmask must keep them although the values are 0
    t = load_file(str(student / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight_packed"][0, :16] = 0
    # a scale above absmax / 127 (as SparseGPT-joint may choose): training starts on this grid
    gate = "model.layers.0.mlp.gate_proj"
    t[f"{gate}.weight_packed"] = torch.div(t[f"{gate}.weight_packed"], 2, rounding_mode="trunc")
    t[f"{gate}.weight_scale"] *= 2
    save_file(t, str(student / "model.safetensors"), metadata={"format": "pt"})
    return root, calib, ev, student


@pytest.fixture(scope="module")
def global_run(tiny):
    from sparse24_tools.__main__ import main

    root, calib, ev, student = tiny
    out = root / "recovered"
    main(["recover", "--teacher", str(root / "dense"), "--student", str(student), "--out", str(out),
          "--calib", str(calib), "--eval-text", str(ev), "--tokens", str(BASE["tokens"]), "--seqlen", "64",
          "--batch-size", "8", "--lr", "1e-3", "--eval-every", "10", "--eval-windows", "8", "--eval-seqlen", "64",
          "--generate-tokens", "600", "--gen-prompt-len", "16", "--gen-batch-size", "8", "--device", "cpu",
          "--threads", "1", "--max-minutes", "0", "--domain", f"code={root / 'code.txt'}",
          "--domain", f"other={root / 'other.txt'}", "--no-progress"])
    return out, json.loads((out / "recover_report.json").read_text())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_masks_on_grid(student: Path, out: Path) -> int:
    before, after = _tensors(student), _tensors(out)
    kinds = ckpt.validate_checkpoint(out, ckpt.load_scheme(out))
    assert kinds == ckpt.validate_checkpoint(student, ckpt.load_scheme(student))
    changed = 0
    for prefix, kind in kinds.items():
        key = f"{prefix}.weight_bitmask" if kind == "sparse" else f"{prefix}.weight"
        if kind == "sparse":
            assert torch.equal(after[key], before[key]), f"{prefix}: bitmask changed"
            q = after[f"{prefix}.weight_packed"]
        else:
            q = after[key]
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        # scale = max(row absmax / 127, the student's scale): a row reaches +-127 or keeps its scale
        s0, s1 = before[f"{prefix}.weight_scale"], after[f"{prefix}.weight_scale"]
        assert bool((s1 >= s0).all()), prefix
        rows = q.abs().amax(1, keepdim=True)
        assert bool(((rows == 127) | (s1 == s0)).all()), prefix
        changed += int(not torch.equal(q, before[key if kind == "dense" else f"{prefix}.weight_packed"]))
    for key in before:  # embeddings, norms, lm_head: frozen by default
        if not key.startswith("model.layers.") or "norm" in key:
            assert torch.equal(after[key], before[key]), key
    return changed


def test_global_recovery_keeps_the_mask_and_exports_the_trained_int8_values(tiny, global_run):
    root, _, ev, student = tiny
    out, rep = global_run
    assert _assert_same_masks_on_grid(student, out) == 14  # every quantized linear was trained
    mask = unpack_bitmask(_tensors(out)["model.layers.0.self_attn.q_proj.weight_bitmask"], 128)
    assert int(mask[0, :32].sum()) == 16  # the zeroed kept values still hold their bits
    # what recover evaluated (its QAT forward) is what the written checkpoint computes
    model, tok = load_for_eval(out)
    ppl = perplexity(model, tok, ev, seqlen=64, windows=8, progress=False)["perplexity"]
    assert ppl == pytest.approx(rep["final_eval"]["perplexity"], rel=PPL_RTOL)
    # and training started from exactly the student (its grid, its values)
    model, tok = load_for_eval(student)
    ppl0 = perplexity(model, tok, ev, seqlen=64, windows=8, progress=False)["perplexity"]
    assert ppl0 == pytest.approx(rep["evals"][0]["perplexity"], rel=PPL_RTOL)
    for f in ("recover_report.json", "recover_curves.png", "compress_report.json", "tokenizer.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "compress_report.json").read_text())["recovered"]["train"]["steps"] == 40
    assert not (root / "recovered.recover-state").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_global_recovery_reduces_the_loss_and_reports_its_data(global_run):
    _, rep = global_run
    kl = [r["kl"] for r in rep["loss_curve"]]
    assert len(kl) == 40 and sum(kl[-5:]) / 5 < 0.5 * kl[0]
    ev = rep["evals"]
    assert [e["tokens"] for e in ev] == [0, 5120, 10240, 15360, 20480]
    assert ev[-1]["kl"] < 0.5 * ev[0]["kl"] and ev[-1]["top1_agreement"] > ev[0]["top1_agreement"]
    d, t = rep["data"], rep["train"]
    assert d["generated_sequences"] == 13 and d["generated_tokens"] == 13 * 48
    assert d["calib_tokens"] == d["calib_windows"] * 64 > 0
    assert t["tokens"] == 20480 == t["tokens_from_calib_windows"] + t["tokens_from_generated_sequences"]
    assert t["tokens_from_generated_sequences"] > 0
    assert rep["seconds"]["train"] > 0 and rep["teacher_eval"]["perplexity"] > 0


def test_every_text_is_reported_dense_one_shot_and_recovered(tiny, global_run):
    root, _, ev, student = tiny
    out, rep = global_run
    domains = rep["domains"]
    assert set(domains) == {"eval-text", "code", "other"}
    assert domains["eval-text"]["one_shot"] == rep["evals"][0]["perplexity"]
    assert domains["eval-text"]["recovered"] == rep["final_eval"]["perplexity"]
    # each number is what offline eval computes on that text: dense teacher, one-shot student, written output
    models = {key: load_for_eval(path) for key, path in
              (("dense", root / "dense"), ("one_shot", student), ("recovered", out))}
    for name, text in (("eval-text", ev), ("code", root / "code.txt"), ("other", root / "other.txt")):
        d = domains[name]
        assert d["text"] == str(text)
        for key, (model, tok) in models.items():
            ppl = perplexity(model, tok, text, seqlen=64, windows=8, progress=False)["perplexity"]
            assert d[key] == pytest.approx(ppl, rel=PPL_RTOL), (name, key)
        assert d["recovered_vs_dense"] == pytest.approx(d["recovered"] / d["dense"], abs=1e-4)
    # text like the training text but not trained on: the recovery carries over
    assert domains["other"]["recovered"] < domains["other"]["one_shot"]


def _tie_margin(model, ids: list[int]) -> float:
    """Smallest distance of any quantized linear's input to a rounding tie, in int8 quanta
    relative to the value (|x / scale|, at least 1): float noise is relative to the value."""
    margins: list[float] = []

    def hook(_m, args):
        x = args[0].double()
        r = x / (x.abs().amax(-1, keepdim=True) / 127)
        margins.append(float((((r - r.floor()) - 0.5).abs() / r.abs().clamp_min(1)).min()))

    hooks = [m.register_forward_pre_hook(hook, prepend=True) for n, m in model.named_modules()
             if n.endswith("_proj")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return min(margins)


@pytest.mark.engine
def test_recovered_checkpoint_runs_in_the_plugin_like_offline_eval(global_run, tmp_path):
    from conftest import run_engine

    out, _ = global_run
    ev, _ = load_for_eval(out)
    # a float32 engine and float32 transformers differ by ~1e-7 relative in the activations: an
    # input that close to a rounding tie may round the other way in one of them (measured: an
    # o_proj input 7.5e-7 (relative) from a tie flipped and moved later log-probs by 1e-2). Take
    # the prompt whose inputs are farthest from any tie, and require >= 2e-6.
    prompts = [list(range(2 + o, 26 + o)) for o in range(0, 360, 3)]
    margin, ids = max((_tie_margin(ev, p), p) for p in prompts)
    assert margin > 2e-6, f"every prompt has an activation within {margin:.2g} (relative) of a rounding tie"
    got, _ = run_engine(out, tmp_path / "engine.json", ids)
    assert got["quantization"] == "sparse24" and len(got["completion_ids"]) > 0
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = (torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ref).abs().max()
    assert diff < LOGPROB_ATOL, f"plugin vs offline eval: max |logprob diff| {diff}"


def test_blocks_mode_fits_every_layer_and_shows_its_progress(tiny, tmp_path, capsys):
    root, calib, ev, student = tiny
    opts = RecoverOptions(**{**BASE, "mode": "blocks", "tokens": 30 * 4 * 64, "batch_size": 4, "lr": 2e-3,
                             "eval_every": 1, "block_pool_tokens": 40 * 64, "eval_text": str(ev), "progress": True})
    rep = recover(root / "dense", student, tmp_path / "blocks", calib, opts)
    # the progress line: tokens of those planned, tokens/s and the time left, the last evaluation
    line = capsys.readouterr().err.split("recover (blocks)")[-1].split("\r")[0]
    assert re.search(r"15\.4k/15\.4k \[[0-9:]+<00:00, +[0-9.]+k?tok/s, .*eval=ppl [0-9.]+@3\.84k", line), line
    _assert_same_masks_on_grid(student, tmp_path / "blocks")
    for layer in (0, 1):
        curve = [r["loss"] for r in rep["loss_curve"] if r["layer"] == layer]
        assert curve[-1] < 0.7 * curve[0], (layer, curve)
    ev_rows = rep["evals"]
    assert [e["layers_done"] for e in ev_rows[:2]] == [0, 1] and ev_rows[-1]["final"]
    assert ev_rows[-1]["kl"] < ev_rows[0]["kl"]
    assert rep["train"]["steps"] == 60 and rep["train"]["tokens"] == 30 * 4 * 64


def test_interrupted_run_leaves_no_output_and_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    import sparse24_tools.recover as rec

    root, calib, ev, student = tiny
    opts = RecoverOptions(**{**BASE, "tokens": 12 * 8 * 64, "eval_every": 4, "save_every": 3,
                             "loss": "kl+squarehead", "quant_from": 0.25, "generate_tokens": 200,
                             "eval_text": str(ev)})
    full = recover(root / "dense", student, tmp_path / "full", calib, opts)
    assert all(r["squarehead"] > 0 for r in full["loss_curve"])

    real = rec.RecoveryRun.count_tokens
    calls = {"n": 0}

    def dies_at_step_8(self, idx):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("injected")
        real(self, idx)

    monkeypatch.setattr(rec.RecoveryRun, "count_tokens", dies_at_step_8)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(root / "dense", student, out, calib, opts)
    monkeypatch.setattr(rec.RecoveryRun, "count_tokens", real)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    state = tmp_path / "out.recover-state" / "state.pt"
    assert torch.load(state, weights_only=False)["step"] == 6
    with pytest.raises(RecoverError, match="--resume"):
        recover(root / "dense", student, out, calib, opts)
    with pytest.raises(RecoverError, match="saved with other options.*'lr'"):
        recover(root / "dense", student, out, calib, RecoverOptions(**{**opts.__dict__, "lr": 5e-4}), resume=True)

    def half_written(tensors, folder, **kw):  # dies while writing the checkpoint
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.write, "save_safetensors_shards", half_written)
    with pytest.raises(OSError, match="injected"):
        recover(root / "dense", student, out, calib, opts, resume=True)
    monkeypatch.undo()
    assert not out.exists() and torch.load(state, weights_only=False)["step"] == 12
    resumed = recover(root / "dense", student, out, calib, opts, resume=True)
    a, b = _tensors(tmp_path / "full"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed["loss_curve"]] == [r["loss"] for r in full["loss_curve"]]
    assert resumed["final_eval"]["perplexity"] == full["final_eval"]["perplexity"]
    assert not state.parent.exists()


def _slow_steps(monkeypatch, seconds: float) -> None:
    """Every optimizer step takes ``seconds`` longer (a large model on a slow machine); the probe,
    which takes no optimizer step, does not."""
    real = torch.optim.AdamW.step

    def slow(self, *a, **kw):
        time.sleep(seconds)
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", slow)


def test_time_budget_fits_the_schedule(tiny, tmp_path, monkeypatch, caplog):
    """A budget far below --tokens: the step count is fitted from the first step's time, warm-up
    and decay follow it, the run ends its schedule in time (no stop half-way) and the model improves."""
    root, calib, ev, student = tiny
    _slow_steps(monkeypatch, 0.25)
    # also the bf16 autocast path that CUDA runs use by default
    opts = RecoverOptions(**{**BASE, "tokens": 100_000 * 8 * 64, "eval_every": 0, "generate_tokens": 0,
                             "max_minutes": 0.4, "amp": "bf16", "warmup": 0.2, "eval_text": str(ev)})
    with caplog.at_level(logging.INFO, logger="sparse24_tools"):
        rep = recover(root / "dense", student, tmp_path / "budget", calib, opts)
    train = rep["train"]
    assert MIN_STEPS <= train["steps"] == train["planned_steps"] < 100_000 and not train["stopped_by_time_budget"]
    lrs = [r["lr"] for r in rep["loss_curve"]]
    # the warm-up of each fitted plan: the first step's time fits one, the median of the next steps
    # refits it (on a loaded machine the two differ, and the ramp follows the plan in force)
    fitted = [int(w) for w in re.findall(r"steps in all \(warm-up (\d+)\)", caplog.text)]
    assert fitted and fitted[-1] == warmup_steps(train["steps"], 0.2), (fitted, train)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(opts.lr) and lrs[-1] < 0.1 * opts.lr
    assert peak + 1 in fitted, (peak, fitted, lrs[:8])
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=False))
    assert rep["seconds"]["total_before_export"] < 0.4 * 60
    assert rep["final_eval"]["kl"] < rep["evals"][0]["kl"]
    logged = caplog.text
    assert "expected peak resident memory" in logged and "expected time: one sequence forward + backward" in logged


@pytest.mark.parametrize("mode", ["global", "blocks"])
def test_a_budget_too_small_to_train_is_refused(tiny, tmp_path, monkeypatch, mode):
    root, calib, _, student = tiny
    _slow_steps(monkeypatch, 3.0)  # 12s are left after the 10s kept for the export: 4 steps
    opts = RecoverOptions(**{**BASE, "mode": mode, "tokens": 1000 * 8 * 64, "eval_every": 0, "generate_tokens": 0,
                             "max_minutes": 0.4})
    unit = "steps per layer" if mode == "blocks" else "steps"
    with pytest.raises(BudgetError, match=rf"--max-minutes 0.4: .* so \d {unit} fit, fewer than the {MIN_STEPS} "
                                          "a run needs to train meaningfully; nothing was written"):
        recover(root / "dense", student, tmp_path / "out", calib, opts)
    assert list(tmp_path.iterdir()) == []
    # so little time that the probe alone shows it, before any training step
    opts.max_minutes = 0.01
    before = r"one sequence's forward \+ backward takes" if mode == "global" else "are left after loading"
    with pytest.raises(BudgetError, match=before):
        recover(root / "dense", student, tmp_path / "out", calib, opts)
    assert list(tmp_path.iterdir()) == []


def _budget_ends_after(monkeypatch, steps: int) -> None:
    """The time runs out once ``steps`` steps are done (steps that got slower than the fit expected)."""
    monkeypatch.setattr(RecoveryRun, "budget_left", lambda self: -1.0 if len(self.curve) >= steps else 1e9)


def test_a_run_that_runs_out_of_time_in_warm_up_writes_nothing(tiny, tmp_path, monkeypatch):
    root, calib, ev, student = tiny
    opts = RecoverOptions(**{**BASE, "warmup": 0.5, "generate_tokens": 0, "max_minutes": 5.0, "eval_text": str(ev)})
    _budget_ends_after(monkeypatch, 3)  # of 40 steps, 20 of them warm-up
    with pytest.raises(BudgetError, match=r"ran out after 3 of 40 steps, before the end of the learning rate's "
                                          r"20-step warm-up; nothing was written"):
        recover(root / "dense", student, tmp_path / "out", calib, opts)
    assert not (tmp_path / "out").exists()
    # past the warm-up the run stops there and writes what it has, if it is better than its input
    _budget_ends_after(monkeypatch, 30)
    rep = recover(root / "dense", student, tmp_path / "out", calib, opts)
    assert rep["train"]["stopped_by_time_budget"] and rep["train"]["steps"] == 30
    assert rep["final_eval"]["perplexity"] < rep["evals"][0]["perplexity"]


def test_a_run_stopped_by_its_budget_worse_than_its_input_writes_nothing(tiny, tmp_path, monkeypatch):
    import sparse24_tools.recover_run as recover_run

    root, calib, ev, student = tiny
    opts = RecoverOptions(**{**BASE, "generate_tokens": 0, "eval_every": 0, "max_minutes": 5.0, "eval_text": str(ev)})
    _budget_ends_after(monkeypatch, 30)
    real = recover_run.evaluate_pair
    calls = []

    def getting_worse(*a, **kw):  # the stand-in for a run whose perplexity rose
        calls.append(1)
        return {**real(*a, **kw), "perplexity": 10.0 + len(calls)}

    monkeypatch.setattr(recover_run, "evaluate_pair", getting_worse)
    with pytest.raises(BudgetError, match=r"ran out after 30 steps with perplexity 12.000, worse than the "
                                          r"student's 11.000; nothing was written"):
        recover(root / "dense", student, tmp_path / "out", calib, opts)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_file(tiny, tmp_path, monkeypatch):
    root, calib, ev, student = tiny
    opts = RecoverOptions(**{**BASE, "generate_tokens": 0})
    dense = root / "dense"
    with pytest.raises(RecoverError, match=r"student .*dense/config.json: no quantization_config"):
        recover(dense, dense, tmp_path / "a", calib, opts)
    compress(dense, tmp_path / "w8a8", CompressOptions(export="dense-w8a8", progress=False))
    with pytest.raises(RecoverError, match=r"w8a8/config.json: quant_method 'compressed-tensors' is not 2:4"):
        recover(dense, tmp_path / "w8a8", tmp_path / "a", calib, opts)

    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    t = _tensors(broken)
    t["model.layers.1.mlp.up_proj.weight_bitmask"][3, 0] = 0b0111  # three of four kept
    save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RecoverError, match=r"broken/model.safetensors: model\.layers\.1\.mlp\.up_proj"
                                           r"\.weight_bitmask: bitmask row 3, columns 0..3 has 3 bits set"):
        recover(dense, broken, tmp_path / "a", calib, opts)

    _save_dense(tmp_path / "narrow", hidden=64, intermediate=256, layers=2)
    with pytest.raises(RecoverError, match=r"teacher .*narrow and student .*student differ in architecture: "
                                           r"hidden_size 64 vs 128"):
        recover(tmp_path / "narrow", student, tmp_path / "a", calib, opts)
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(dense, other_vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other_vocab)
    with pytest.raises(RecoverError, match=r"other_vocab and student .* different vocabularies \(385 vs 384"):
        recover(other_vocab, student, tmp_path / "a", calib, opts)

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(CalibrationError, match="empty.txt is empty"):
        recover(dense, student, tmp_path / "a", empty, opts)
    with pytest.raises(InputError, match="--eval-text .*empty.txt: empty"):
        recover(dense, student, tmp_path / "a", calib, RecoverOptions(**{**opts.__dict__, "eval_text": str(empty)}))
    missing = tmp_path / "missing.py"
    import sparse24_tools.recover as rec

    def no_loading(*_a, **_kw):
        raise AssertionError("loaded a model before checking the inputs")

    with monkeypatch.context() as m, pytest.raises(InputError, match=r"--domain code .*missing.py: no such file"):
        m.setattr(rec, "load_student", no_loading)
        recover(dense, student, tmp_path / "a", calib, RecoverOptions(**{**opts.__dict__, "domain": (f"code={missing}",)}))
    for bad, why in (("code", "expected NAME=PATH"), ("eval-text=x.txt", "reserved for --eval-text"),
                     (f"a={ev}", "given twice")):
        with pytest.raises(RecoverError, match=why):
            RecoverOptions(domain=(bad, f"a={ev}") if why == "given twice" else (bad,)).validate()
    with pytest.raises(RecoverError, match="less than one batch"):
        recover(dense, student, tmp_path / "a", calib, RecoverOptions(**{**opts.__dict__, "tokens": 100}))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        recover(dense, student, tmp_path / "exists", calib, opts)
    assert not (tmp_path / "a").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_documents_every_option():
    from sparse24_tools.__main__ import build_parser

    recover_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["recover"]
    flags = {a.dest: a for a in recover_parser._actions if a.dest != "help"}
    assert all(a.help for a in flags.values()), [d for d, a in flags.items() if not a.help]
    assert set(RecoverOptions.__dataclass_fields__) <= set(flags)


def test_recovery_benchmark_script_smoke_on_the_tiny_model(tiny, tmp_path):
    import importlib.util

    root, calib, ev, _ = tiny
    spec = importlib.util.spec_from_file_location("recovery_smollm2", REPO / "benchmarks" / "recovery_smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = ["--teacher", str(root / "dense"), "--calib", str(calib), "--eval-text", str(ev),
              "--domain", f"other={root / 'other.txt'}", "--out", str(tmp_path), "--smoke", "--minutes", "2",
              "--device", "cpu"]
    # in two invocations: the second reuses the all-sparse student and keeps the first's runs
    bench.main([*common, "--students", "all-sparse"])
    first = (tmp_path / "students" / "all-sparse" / "model.safetensors").stat().st_mtime_ns
    doc = bench.main([*common, "--students", "auto10"])
    assert (tmp_path / "students" / "all-sparse" / "model.safetensors").stat().st_mtime_ns == first
    (path,) = tmp_path.glob("recovery-smollm2-cpu-*.json")
    saved = json.loads(path.read_text())
    assert saved["runs"] == doc["runs"] and saved["dense_ppl"] == doc["dense_ppl"] > 0
    assert path.with_suffix(".png").exists()
    assert [(r["mode"], r["dense_layers"]) for r in saved["runs"]] == [
        ("global", []), ("blocks", []), ("global", "auto:10"), ("blocks", "auto:10")]
    smoke = {"seqlen", "batch_size", "tokens", "generate_tokens", "gen_batch_size", "block_pool_tokens",
             "eval_windows", "eval_seqlen", "eval_every"}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(RecoverOptions()).items()}
    for r in saved["runs"]:
        assert r["tokens"] > 0 and r["ppl_after"] > 0 and r["minutes"] <= 2
        assert r["curve"][0]["tokens"] == 0 and r["curve"][-1]["tokens"] == r["tokens"]
        # every text: dense, one-shot, recovered (the eval text's are the run's before / after)
        assert set(r["domains"]) == {"eval-text", "other"} and r["domains"]["eval-text"]["recovered"] == r["ppl_after"]
        assert all(d["dense"] > 0 and d["one_shot"] > 0 and d["recovered"] > 0 for d in r["domains"].values())
        # the run is `vllm-sparse24 recover` with its defaults: only the texts, budget and smoke sizes differ
        assert r["recover_command"].startswith("vllm-sparse24 recover --teacher ")
        given = {k for k, v in r["options"].items() if v != defaults[k]}
        assert given - smoke == {"eval_text", "domain", "max_minutes", "device"} | ({"mode"} if r["mode"] == "blocks" else set())
    assert saved["runs"][0]["ppl_before"] == saved["runs"][1]["ppl_before"]
    for student in ("all-sparse", "auto10"):
        kinds = ckpt.validate_checkpoint(tmp_path / "students" / student, ckpt.load_scheme(tmp_path / "students" / student))
        assert ("dense" in kinds.values()) == (student == "auto10")
    # fp8 students, one-shot only (no --modes), into the same JSON: keyed by scheme
    doc = bench.main([*common, "--students", "all-sparse", "--scheme", "fp8", "--modes"])
    fp8_student = tmp_path / "students" / "all-sparse-fp8"
    assert ckpt.load_scheme(fp8_student).quant == "fp8"
    saved = json.loads(path.read_text())
    assert saved["runs"] == doc["runs"] and [r["scheme"] for r in saved["runs"]] == ["int8"] * 4
    fp8 = saved["one_shot"]["fp8"]["all-sparse"]
    assert set(saved["one_shot"]) == {"int8", "fp8"} and set(fp8) == {"eval-text", "other"} and fp8["other"] > 0
    assert saved["table"]["fp8"]["all-sparse"]["one_shot"] == fp8["eval-text"]
    assert saved["table"]["fp8"]["all-sparse"]["texts"]["other"] == {"dense": saved["dense"]["other"],
                                                                     "one_shot": fp8["other"]}
    assert saved["table"]["int8"]["all-sparse"]["one_shot"] == saved["runs"][0]["ppl_before"]
    assert set(saved["table"]["int8"]["auto10"]) == {"one_shot", "global", "blocks", "texts"}
    assert set(saved["table"]["int8"]["auto10"]["texts"]["other"]) == {"dense", "one_shot", "global", "blocks"}
    assert len(bench.markdown_table(saved).splitlines()) == 2 + 3 * 2  # header + (3 students x 2 texts)

    # runs made side by side (one --out each) merge into one JSON + PNG, keyed by scheme, student, mode
    other = json.loads(path.read_text())
    other["runs"] = other["runs"][:1]
    other["runs"][0] = {**other["runs"][0], "ppl_after": 1.5}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / path.name).write_text(json.dumps(other))
    merged = bench.main(["--out", str(tmp_path / "merged"), "--merge", str(path), str(tmp_path / "other" / path.name)])
    assert (tmp_path / "merged" / path.name).exists() and (tmp_path / "merged" / path.with_suffix(".png").name).exists()
    assert len(merged["runs"]) == 4 and merged["runs"][-1]["ppl_after"] == 1.5
    assert merged["one_shot"] == saved["one_shot"] and merged["table"]["int8"]["all-sparse"]["global"] == 1.5


def test_time_budget_fit_counts_evaluations_and_keeps_the_run_long():
    """Planned from a huge --tokens with evaluations every few steps: the remaining steps and
    their evaluations fill the time that is left (not one step, not more than the time)."""
    from types import SimpleNamespace

    from sparse24_tools.recover_global import _fit_budget

    run = SimpleNamespace(budget_left=lambda: 300.0, eval_seconds=lambda: 2.0, elapsed=lambda: 10.0,
                          opts=SimpleNamespace(max_minutes=5.0, eval_every=25, warmup=0.05))
    step, step_s, every = 4, 0.1, 25
    total = _fit_budget(run, step, 10**9, step_s, refuse_below=True)
    n = total - step
    needed = n * step_s + (n // every) * 2.0 + 10.0 + 2.0  # steps, evaluations, final eval + export
    assert 0.95 * 300 <= needed <= 300
    assert _fit_budget(run, step, 100, step_s, refuse_below=True) == 100  # a plan that fits stays as it is
    with pytest.raises(BudgetError, match=f"fewer than the {MIN_STEPS}"):
        _fit_budget(run, 1, 10**9, 300 / 5, refuse_below=True)
    assert _fit_budget(run, 4, 10**9, 300 / 3, refuse_below=False) == MIN_STEPS  # a refit keeps the minimum
