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
`causal_lm_objective` also folds the next-token cross-entropy into that pass: the task loss and the
KL share one log-softmax per chunk and one gradient tensor, where the model's own loss followed by
a separate KL would make four more passes over the logits and add two logit-sized gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Elements per chunk on CPU (1 MB per float32 tensor): measured over vocabularies of 1k-32k, 2^18
# is fastest; 2^16 and 2^20 are 15-30% slower (per-operation overhead below, a chunk and its four
# temporaries falling out of L2 cache above). A GPU pays a kernel launch per operation per chunk
# and has no such cache to fit, so it takes 16x larger chunks (about 80 MB of temporaries).
CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ObjectiveWeights:
    """Multipliers of the chunked objective's row sums: total = task_a*CE(A) + task_b*CE(B) + kl_weight*kl*KL.

    ``task_a``/``task_b`` and ``kl`` hold the normalisation (1 / item count); 0 switches a task term
    off. ``smoothing`` is the label-smoothing epsilon, as transformers' LabelSmoother defines it.
    """

    kl: float
    kl_weight: float = 1.0
    task_a: float = 0.0
    task_b: float = 0.0
    smoothing: float = 0.0
    symmetric: bool = True


class _ChunkedObjective(torch.autograd.Function):
    """Task cross-entropy plus 0.5*(KL(A||B) + KL(B||A)) (or KL(A||B)) over selected rows; with no
    ``logits_b``, the cross-entropy of A alone.

    Per row, with p = softmax(a), q = softmax(b), d = log p - log q, KL weight c and task weight t:
      symmetric KL:  dA = c/2 * (p * (d - KL(p||q) + 1) - q),   dB likewise with a and b swapped;
      one-way KL:    dA = c * p * (d - KL(p||q)),                dB = c * (q - p);
      cross-entropy: dA = t * (p - (1 - e) * onehot(y) - e / V)  (label smoothing e).
    Each gradient is assembled in place as p * (alpha * d + beta_row) - gamma * q - delta: three
    passes over a chunk that fits in cache. Returns (total, task, kl), the last two normalised as
    ``weights`` say, kl before its weight; only ``total`` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits_a, logits_b, rows, targets, weights: ObjectiveWeights):  # type: ignore[override]
        grad_a = _gradient_buffer(logits_a, rows) if ctx.needs_input_grad[0] else None
        grad_b = _gradient_buffer(logits_b, rows) if ctx.needs_input_grad[1] else None
        task = torch.zeros((), dtype=torch.float32, device=logits_a.device)
        kl = torch.zeros((), dtype=torch.float32, device=logits_a.device)
        c = weights.kl * weights.kl_weight
        for offset, first, last in _segments(rows, _chunk_rows(logits_a)):
            chunk_targets = targets[offset : offset + last - first] if targets is not None else None
            log_p = F.log_softmax(logits_a[first:last].float(), dim=-1)
            task += weights.task_a * _cross_entropy(log_p, chunk_targets, weights) if weights.task_a else 0.0
            if logits_b is None:
                if grad_a is not None:
                    _assemble(grad_a[first:last], log_p.exp_(), weights.task_a, task_weight=weights.task_a,
                              targets=chunk_targets, smoothing=weights.smoothing)
                continue
            log_q = F.log_softmax(logits_b[first:last].float(), dim=-1)
            task += weights.task_b * _cross_entropy(log_q, chunk_targets, weights) if weights.task_b else 0.0
            p, q = log_p.exp(), log_q.exp()
            d = log_p.sub_(log_q)
            kl_pq = _row_dot(p, d)
            if weights.symmetric:
                kl_qp = -_row_dot(q, d)
                kl += 0.5 * (kl_pq + kl_qp).sum()
                sides = ((grad_a, p, q, 0.5 * c, 0.5 * c * (1 - kl_pq), 0.5 * c, weights.task_a),
                         (grad_b, q, p, -0.5 * c, 0.5 * c * (1 - kl_qp), 0.5 * c, weights.task_b))
            else:
                kl += kl_pq.sum()
                sides = ((grad_a, p, q, c, -c * kl_pq, 0.0, weights.task_a),
                         (grad_b, q, p, 0.0, c, c, weights.task_b))
            for grad, own, other, alpha, beta, gamma, task_weight in sides:
                if grad is not None:
                    _assemble(grad[first:last], own, beta + task_weight, diff=d, alpha=alpha, other=other, gamma=gamma,
                              task_weight=task_weight, targets=chunk_targets, smoothing=weights.smoothing)
        ctx.save_for_backward(grad_a, grad_b)
        ctx.logit_dtypes = (logits_a.dtype, None if logits_b is None else logits_b.dtype)
        kl = kl * weights.kl
        ctx.mark_non_differentiable(task, kl)
        return task + weights.kl_weight * kl, task, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_task, _grad_kl):  # type: ignore[override]
        grads = [None if grad is None else _scaled(grad, grad_total).to(dtype)
                 for grad, dtype in zip(ctx.saved_tensors, ctx.logit_dtypes)]
        return grads[0], grads[1], None, None, None


def _chunk_rows(logits: torch.Tensor) -> int:
    elements = CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // logits.shape[-1])


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products as [R, 1]. (`vecdot` over a chunk in cache is 4x faster on CPU than
    a batched matmul of [R, 1, V] by [R, V, 1].)"""
    return torch.linalg.vecdot(x, y).unsqueeze(1)


def _cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor, weights: ObjectiveWeights) -> torch.Tensor:
    """Summed cross-entropy with label smoothing: (1-e) * -log p(y) + e * mean over the vocabulary of -log p."""
    loss = -(1.0 - weights.smoothing) * log_probs.gather(1, targets.unsqueeze(1)).sum()
    if weights.smoothing:
        loss = loss - weights.smoothing * log_probs.mean(-1).sum()
    return loss


def _assemble(out, own, beta, *, diff=None, alpha=0.0, other=None, gamma=0.0, task_weight=0.0, targets=None, smoothing=0.0):
    """Write own * (alpha * diff + beta) - gamma * other - t * ((1-e) * onehot + e/V) into ``out``.

    ``beta`` is a float or a [R, 1] column. Computed in ``out`` itself when it is float32 (no
    temporary, no copy): one pass for alpha * diff + beta, one for the product, one for gamma.
    """
    grad = out if out.dtype == torch.float32 else torch.empty_like(own)
    if alpha:
        torch.add(torch.as_tensor(beta, device=own.device), diff, alpha=alpha, out=grad).mul_(own)
    else:
        torch.mul(own, beta, out=grad)
    if gamma:
        grad.sub_(other, alpha=gamma)
    if task_weight:
        if smoothing:
            grad.sub_(task_weight * smoothing / own.shape[-1])
        grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(grad[:, :1], -task_weight * (1.0 - smoothing)))
    if grad is not out:
        out.copy_(grad)


def _segments(rows: torch.Tensor, step: int) -> list[tuple[int, int, int]]:
    """Split sorted ``rows`` into runs of consecutive indices of at most ``step`` rows, as
    (offset into rows, first row, end row): each run is a slice of the logits, a view, where
    gathering rows by index would copy them (and scattering the gradient back copy again)."""
    if len(rows) == 0:
        return []
    breaks = (torch.diff(rows) != 1).nonzero().flatten().add_(1).tolist()
    segments = []
    for begin, end in zip([0, *breaks], [*breaks, len(rows)]):
        first = int(rows[begin])
        for offset in range(begin, end, step):
            count = min(step, end - offset)
            segments.append((offset, first + offset - begin, first + offset - begin + count))
    return segments


def _gradient_buffer(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of ``logits``, filled row by row in the forward pass; rows outside ``rows`` are 0.

    float16 logits (fp16 autocast) get a float32 buffer: the gradient is formed before the loss
    scale is known, and float16 can hold neither its small entries unscaled (they flush to zero)
    nor GradScaler's first scale of 2**16 (inf). It is cast to float16 after scaling, as the stock
    loss's gradient is."""
    dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
    buffer = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    if len(rows) < logits.shape[0]:
        unused = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        unused[rows] = False
        buffer[unused] = 0
    return buffer


def _scaled(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad * factor`` without a logit-sized pass when the factor is 1 (a plain ``loss.backward()``)."""
    return grad if bool(factor == 1) else grad * factor.to(grad.dtype)


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """Causal LM: flat indices (into [B*T]) of positions whose next token is supervised."""
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return supervised.flatten().nonzero().flatten()


def supervised_token_count(labels: torch.Tensor) -> int:
    """Causal LM: how many next tokens carry a label (what the model's own loss averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_objective(
    logits: torch.Tensor, target_logits: torch.Tensor | None, targets: torch.Tensor, weights: ObjectiveWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, task, kl) of a causal LM's two passes, computed in one chunked pass over the logits.

    ``logits`` and ``target_logits`` are [R, V]: the rows of the supervised positions only (see
    `supervised_rows`); ``targets`` [R] holds each row's next token. ``weights`` carry every
    normalisation (divide by the item count there). Detach ``target_logits`` for one-branch KL and
    the `js` target; without it (one pass, no compensation) the total is the cross-entropy alone.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    task_targets = targets if weights.task_a or weights.task_b else None
    return _ChunkedObjective.apply(logits, target_logits, rows, task_targets, weights)


def kl_consistency(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    rows: torch.Tensor,
    *,
    symmetric: bool = True,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL compensation term between ``logits`` and ``target_logits`` over ``rows`` of the flattened
    logits (detach the target for one-branch KL), divided by ``num_items`` (else the row count).
    ``symmetric=False`` gives KL(P_logits || P_target), the `js` variant."""
    count = num_items if num_items is not None else max(len(rows), 1)
    weights = ObjectiveWeights(kl=1.0 / float(count), symmetric=symmetric)
    flat_a = logits.reshape(-1, logits.shape[-1])
    flat_b = target_logits.reshape(-1, target_logits.shape[-1])
    total, _, _ = _ChunkedObjective.apply(flat_a, flat_b, rows, None, weights)
    return total


def squared_consistency(
    logits: torch.Tensor, target_logits: torch.Tensor, *, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The compensation term of a score (regression): half the squared difference, per item."""
    per_item = 0.5 * (logits.float().squeeze(-1) - target_logits.float().squeeze(-1)) ** 2
    return per_item.sum() / (num_items if num_items is not None else max(per_item.numel(), 1))
