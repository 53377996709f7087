"""Distillation losses for accuracy recovery (pure tensor math, no model walking).

* :func:`chunked_kl`: KL(teacher || student) of the next-token distributions, computed from the
  final hidden states and the two output embeddings one slice of the vocabulary at a time (online
  log-sum-exp, as flash attention does for its softmax), so a [tokens, vocab] logits tensor is
  never materialized; the gradient with respect to the student's hidden states is accumulated in
  the same pass.
* :func:`squarehead_loss`: SquareHead (Kurtic et al. 2023), the mean over decoder layers of
  ||t - s||^2 / ||t||^2 on the layers' outputs.
* :func:`normalized_mse`: the same ratio for one tensor (block-wise reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# at most this many logits (tokens x vocabulary slice) per temporary, whatever the chunk asked
_MAX_CHUNK_ELEMENTS = 1 << 26


def _chunk(n_tokens: int, vocab: int, chunk: int) -> int:
    return max(1, min(chunk, vocab, _MAX_CHUNK_ELEMENTS // max(n_tokens, 1)))


class _ChunkedKL(torch.autograd.Function):
    """Per-token KL(p_t || p_s) with p = softmax(h @ W^T); see :func:`chunked_kl`."""

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, chunk):  # type: ignore[override]
        with torch.autocast(device_type=hs.device.type, enabled=False):
            hs32, ht32 = hs.detach().float(), ht.detach().float()
            n, v = hs32.shape[0], ws.shape[0]
            c = _chunk(n, v, chunk)
            dev = hs32.device
            neg_inf = torch.full((n,), float("-inf"), device=dev)
            mt, ms = neg_inf.clone(), neg_inf.clone()
            st = torch.zeros(n, device=dev)
            ss = torch.zeros(n, device=dev)
            at = torch.zeros(n, device=dev)  # running sum of exp(zt - mt) * (zt - zs)
            gt = torch.zeros_like(hs32)  # running sum of exp(zt - mt) * ws_v
            gs = torch.zeros_like(hs32)  # running sum of exp(zs - ms) * ws_v
            best_t = neg_inf.clone()
            best_s = neg_inf.clone()
            arg_t = torch.zeros(n, dtype=torch.long, device=dev)
            arg_s = torch.zeros(n, dtype=torch.long, device=dev)
            for v0 in range(0, v, c):
                wsc = ws[v0 : v0 + c].detach().float()
                zs = hs32 @ wsc.t()
                zt = ht32 @ wt[v0 : v0 + c].detach().float().t()
                # teacher normalizer, the KL numerator and the teacher's expectation of ws
                mt_new = torch.maximum(mt, zt.amax(-1))
                alpha = torch.exp(mt - mt_new)
                et = torch.exp(zt - mt_new[:, None])
                st = st * alpha + et.sum(-1)
                at = at * alpha + (et * (zt - zs)).sum(-1)
                gt = gt * alpha[:, None] + et @ wsc
                mt = mt_new
                # student normalizer and its expectation of ws
                ms_new = torch.maximum(ms, zs.amax(-1))
                alpha = torch.exp(ms - ms_new)
                es = torch.exp(zs - ms_new[:, None])
                ss = ss * alpha + es.sum(-1)
                gs = gs * alpha[:, None] + es @ wsc
                ms = ms_new
                # top-1 of each (the first index wins ties, as argmax over the full vocabulary)
                for z, best, arg in ((zt, best_t, arg_t), (zs, best_s, arg_s)):
                    val, idx = z.max(-1)
                    better = val > best
                    best.copy_(torch.where(better, val, best))
                    arg.copy_(torch.where(better, idx + v0, arg))
            lse_t = mt + torch.log(st)
            lse_s = ms + torch.log(ss)
            kl = at / st - lse_t + lse_s
            grad_hs = gs / ss[:, None] - gt / st[:, None]
        ctx.save_for_backward(grad_hs, hs, ht, ws, wt, lse_s, lse_t)
        ctx.chunk = c
        agree = arg_t == arg_s
        ctx.mark_non_differentiable(agree)
        return kl.clamp_min(0.0), agree

    @staticmethod
    def backward(ctx, grad_kl, _grad_agree):  # type: ignore[override]
        grad_hs, hs, ht, ws, wt, lse_s, lse_t = ctx.saved_tensors
        g = grad_kl.float()
        dh = (grad_hs * g[:, None]).to(hs.dtype) if ctx.needs_input_grad[0] else None
        dws = None
        if ctx.needs_input_grad[2]:  # the student's output embedding is trained too
            with torch.autocast(device_type=hs.device.type, enabled=False):
                hs32, ht32 = hs.detach().float(), ht.detach().float()
                dws = torch.empty_like(ws, dtype=torch.float32)
                c = ctx.chunk
                for v0 in range(0, ws.shape[0], c):
                    wsc = ws[v0 : v0 + c].detach().float()
                    ps = torch.exp(hs32 @ wsc.t() - lse_s[:, None])
                    pt = torch.exp(ht32 @ wt[v0 : v0 + c].detach().float().t() - lse_t[:, None])
                    dws[v0 : v0 + c] = ((ps - pt) * g[:, None]).t() @ hs32
                dws = dws.to(ws.dtype)
        return dh, None, dws, None, None


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL(teacher || student) [N], per-token top-1 agreement bool [N]).

    ``*_hidden`` [N, H] are the final (normed) hidden states, ``*_head`` [V, H] the output
    embeddings (lm_head weights, no bias). Computed in float32 ``chunk`` vocabulary rows at a
    time; differentiable in ``student_hidden`` and ``student_head`` (not the teacher's)."""
    if student_hidden.dim() != 2 or teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"hidden states must both be [N, H]: student {tuple(student_hidden.shape)}, "
            f"teacher {tuple(teacher_hidden.shape)}"
        )
    if student_head.shape != teacher_head.shape or student_head.shape[1] != student_hidden.shape[1]:
        raise ValueError(
            f"output embeddings must both be [V, H={student_hidden.shape[1]}]: student "
            f"{tuple(student_head.shape)}, teacher {tuple(teacher_head.shape)}"
        )
    return _ChunkedKL.apply(student_hidden, teacher_hidden, student_head, teacher_head, chunk)


def kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) from full logits [N, V] (for tests and small models)."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    lt = torch.log_softmax(teacher_logits.to(dt), -1)
    ls = torch.log_softmax(student_logits.to(dt), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12,
                   denominator: torch.Tensor | None = None) -> torch.Tensor:
    """||t - s||^2 / ||t||^2 over the whole tensor (float32); ``denominator`` replaces ||t||^2
    (a value summed over several processes' data)."""
    t = teacher.detach().float()
    den = t.pow(2).sum() if denominator is None else denominator
    return (student.float() - t).pow(2).sum() / den.clamp_min(eps)


def squarehead_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over layers of :func:`normalized_mse` of each decoder layer's output.

    ``reduce`` (data split over several processes): maps this process's per-layer ||t||^2 [L]
    to their mean over the processes. Each layer's ratio then divides this process's ||t - s||^2
    by that mean, so that the mean of the processes' losses (and of their gradients, which FSDP
    averages) is the loss of the whole batch, sum ||t - s||^2 / sum ||t||^2."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"squarehead: {len(student)} student vs {len(teacher)} teacher layer outputs")
    dens = torch.stack([t.detach().float().pow(2).sum() for t in teacher])
    if reduce is not None:
        dens = reduce(dens)
    return torch.stack([normalized_mse(s, t, denominator=d)
                        for s, t, d in zip(student, teacher, dens, strict=True)]).mean()
