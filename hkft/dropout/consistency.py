"""Compensation losses between two forward passes (the `kl` and `js` compensations).

Distributions are the model's output distributions: class probabilities for classification,
next-token distributions on the supervised tokens for causal LM. Regression has no distribution:
its prediction is read as the mean of a unit-variance Gaussian, for which the symmetric KL is
0.5 * (a - b)^2 (the squared-error consistency R-Drop uses for STS-B).

Every loss is a sum over items (examples, or supervised tokens) divided by ``num_items``: pass the
item count of the whole gradient-accumulation window (the Trainer's ``num_items_in_batch``) so that
accumulation gives the same loss as one large batch; without it the mean over this batch is used.

For language models the KL runs over [tokens, vocabulary] tensors as large as the logits. It is
computed in row chunks that stay in cache, and its gradient is formed in the same pass, so that
autograd keeps one gradient-sized tensor per differentiated input instead of every intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows per chunk: about 4 MB of float32 per tensor for a 32k vocabulary.
CHUNK_ELEMENTS = 1 << 20


class _ChunkedKL(torch.autograd.Function):
    """sum over rows of 0.5*(KL(A||B) + KL(B||A)) (or KL(A||B)), times ``scale``.

    Gradients (p = softmax(a), q = softmax(b), d = log p - log q, per row):
      symmetric: dA = 0.5 * (p * (d - KL(p||q)) + p - q), dB by symmetry;
      one-way:   dA = p * (d - KL(p||q)),                 dB = q - p.
    """

    @staticmethod
    def forward(ctx, logits_a, logits_b, rows, scale: float, symmetric: bool):  # type: ignore[override]
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.empty(len(rows), logits_a.shape[-1], dtype=logits_a.dtype, device=logits_a.device) if need_a else None
        grad_b = torch.empty(len(rows), logits_b.shape[-1], dtype=logits_b.dtype, device=logits_b.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=logits_a.device)
        step = max(1, CHUNK_ELEMENTS // logits_a.shape[-1])
        for start in range(0, len(rows), step):
            index = rows[start : start + step]
            log_p = F.log_softmax(logits_a.index_select(0, index).float(), dim=-1)
            log_q = F.log_softmax(logits_b.index_select(0, index).float(), dim=-1)
            p, q, d = log_p.exp(), log_q.exp(), log_p - log_q
            kl_pq = (p * d).sum(-1, keepdim=True)
            if symmetric:
                kl_qp = -(q * d).sum(-1, keepdim=True)
                total += 0.5 * (kl_pq + kl_qp).sum()
                if need_a:
                    grad_a[start : start + step] = (0.5 * scale) * (p * (d - kl_pq) + p - q)
                if need_b:
                    grad_b[start : start + step] = (0.5 * scale) * (q * (-d - kl_qp) + q - p)
            else:
                total += kl_pq.sum()
                if need_a:
                    grad_a[start : start + step] = scale * (p * (d - kl_pq))
                if need_b:
                    grad_b[start : start + step] = scale * (q - p)
        ctx.save_for_backward(rows, grad_a, grad_b)
        ctx.shapes = (logits_a.shape, logits_b.shape)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        rows, grad_a, grad_b = ctx.saved_tensors
        grads = []
        for grad, shape in ((grad_a, ctx.shapes[0]), (grad_b, ctx.shapes[1])):
            if grad is None:
                grads.append(None)
                continue
            full = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
            full.index_copy_(0, rows, grad * grad_output.to(grad.dtype))
            grads.append(full)
        return grads[0], grads[1], None, None, None


def chunked_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, rows: torch.Tensor, *, scale: float, symmetric: bool
) -> torch.Tensor:
    """KL over the selected ``rows`` of two [R, V] logit tensors (see `_ChunkedKL`)."""
    return _ChunkedKL.apply(logits_a, logits_b, rows, scale, symmetric)


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """Causal LM: flat indices (into [B*T]) of positions whose next token is supervised."""
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return supervised.flatten().nonzero().flatten()


def consistency_loss(
    task: str,
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    symmetric: bool = True,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The compensation term between ``logits`` and ``target_logits`` (detach the target for
    one-branch KL). ``symmetric=False`` gives KL(P_logits || P_target), the `js` variant."""
    if task == "regression":
        per_item = 0.5 * (logits.float().squeeze(-1) - target_logits.float().squeeze(-1)) ** 2
        return per_item.sum() / (num_items if num_items is not None else max(per_item.numel(), 1))
    if task == "causal-lm":
        if labels is None:
            raise ValueError("causal-lm consistency needs the labels to find supervised tokens")
        rows = supervised_rows(labels)
    else:
        rows = torch.arange(logits.shape[0], device=logits.device)
    count = num_items if num_items is not None else max(len(rows), 1)
    scale = 1.0 / float(count)
    flat_a = logits.reshape(-1, logits.shape[-1])
    flat_b = target_logits.reshape(-1, target_logits.shape[-1])
    return chunked_kl(flat_a, flat_b, rows, scale=scale, symmetric=symmetric)
