"""Compensation losses between two forward passes (the `kl` and `js` compensations).

Distributions are the model's output distributions: class probabilities for classification,
next-token distributions on the supervised tokens for causal LM. Regression has no distribution:
its prediction is read as the mean of a unit-variance Gaussian, for which the symmetric KL is
0.5 * (a - b)^2 (the squared-error consistency R-Drop uses for STS-B).

Every loss is a sum over items (examples, or supervised tokens) divided by ``num_items``: pass the
item count of the whole gradient-accumulation window (the Trainer's ``num_items_in_batch``) so that
accumulation gives the same loss as one large batch; without it the mean over this batch is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, from log-probabilities over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """0.5 * (KL(A||B) + KL(B||A)) per row, computed in float32."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    return 0.5 * (kl_divergence(log_a, log_b) + kl_divergence(log_b, log_a))


def supervised_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM: the next-token logits at positions whose next label is supervised, [N, V]."""
    shifted_logits = logits[:, :-1, :]
    supervised = labels[:, 1:] != IGNORE_INDEX
    return shifted_logits[supervised]


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
    else:
        if task == "causal-lm":
            if labels is None:
                raise ValueError("causal-lm consistency needs the labels to find supervised tokens")
            logits, target_logits = supervised_rows(logits, labels), supervised_rows(target_logits, labels)
        if symmetric:
            per_item = symmetric_kl(logits, target_logits)
        else:
            per_item = kl_divergence(F.log_softmax(logits.float(), -1), F.log_softmax(target_logits.float(), -1))
    denominator = num_items if num_items is not None else max(per_item.numel(), 1)
    return per_item.sum() / denominator
