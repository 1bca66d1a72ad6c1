"""Skip the last encoder layer's work on tokens that no head reads.

A BERT-family sequence classifier reads one token of the last layer: the first ([CLS] / <s>),
through BERT's pooler or RoBERTa's classification head. Keys and values of that layer still need
every token, but its attention output projection and its feed-forward block (about three quarters
of the layer) are only needed at position 0. Slicing the two inputs of the layer's
self-attention output module to the first token leaves logits, loss and gradients exactly as they
were (tested against the stock model) and saves that work in every pass: the training pass, the
KL target pass and evaluation. Transformers computes every token (it cannot know the head), so
this is a real saving for an encoder classifier, about 10% of a MiniLM-L6 step.

Only model types whose heads are known to read the first token are sliced; everything else, and
token-level tasks, run unchanged. The last hidden state then has length 1, which nothing in
training or evaluation reads. Entry-wise and feature-wise dropout of the sliced feed-forward
output draws the first token's mask as before; a token span is drawn over the whole sequence, so
a plan that drops hidden spans in the last layer leaves that layer whole.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from hkft.dropout import DropoutController
from hkft.dropout.architecture import transformer_layers, transformers_model

# Model types whose sequence-classification head reads hidden[:, 0] of the last layer, and
# whose layers compute `attention.output(attention, residual)` before the feed-forward block.
FIRST_TOKEN_HEADS = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def _first_token_only(module: nn.Module, args: tuple) -> tuple:
    return tuple(arg[:, :1] for arg in args)


def compute_first_token_only(model: nn.Module, sequence_head: bool, dropout: DropoutController) -> RemovableHandle | None:
    """Make the last layer compute its output for the first token only, where that is exact
    (``sequence_head``: the task's head reads the first token; a language model reads every token).

    Returns the hook's handle (remove it to restore full outputs), or None where not applicable.
    """
    base = transformers_model(model)
    if not sequence_head or getattr(base.config, "model_type", None) not in FIRST_TOKEN_HEADS:
        return None
    layers = transformer_layers(model)
    if dropout.drops_token_spans(len(layers) - 1):
        return None
    try:
        output = layers[-1].get_submodule("attention.output")
    except AttributeError:
        return None
    return output.register_forward_pre_hook(_first_token_only)
