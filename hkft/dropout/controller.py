"""Instrument a model with a `DropoutPlan` and keep its mask generator.

Order of work: switch the model's own dropout off (for the method `dropout`, set it to
``plan.model_dropout`` in the selected layers), then attach the plan's positions to the selected
layers. Masks apply only while the module is training, so eval mode is the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hkft.dropout import architecture
from hkft.dropout.attention import (
    ATTENTION_NAME,
    AttentionDrop,
    as_visibility,
    intercept_attention,
    register_attention,
)
from hkft.dropout.patterns import (
    Extent,
    MaskSampler,
    causal_mask,
    packed_extent,
    token_extent,
)
from hkft.dropout.plan import DropoutPlan, patterns_for
from hkft.dropout.positions import EmbeddingNoise, FeatureDrop, always

ATTENTION_ATTRIBUTE = "hkft_attention_drop"


def keys_of_every_query(visible: torch.Tensor) -> torch.Tensor | None:
    """A [B, 1, Q, K] visibility as [B, 1, 1, K] when every query sees the same keys, else None."""
    first_query = visible[..., :1, :]
    return first_query if bool((visible == first_query).all()) else None


def keys_below_the_triangle(visible: torch.Tensor) -> torch.Tensor | None:
    """A [B, 1, Q, K] visibility as [B, 1, 1, K] when it is the causal triangle over some keys (those
    the last query sees: the real tokens under left or right padding), else None."""
    keys = visible[..., -1:, :]
    triangle = causal_mask(visible.shape[-2], visible.shape[-1], visible.device)
    return keys if bool((visible == (triangle & keys)).all()) else None


@dataclass
class Applications:
    """Which application of a shared block is running (ALBERT runs one block ``num_hidden_layers``
    times): reset before each forward of the model, advanced before each forward of a block."""

    current: int = -1

    def reset(self, module: nn.Module, args: tuple) -> None:
        self.current = -1

    def advance(self, module: nn.Module, args: tuple) -> None:
        self.current += 1

    def among(self, indices: tuple[int, ...]) -> Callable[[], bool]:
        return lambda: self.current in indices


@dataclass
class DropoutController:
    plan: DropoutPlan
    sampler: MaskSampler
    layers: tuple[int, ...] = ()
    # Whether training rows are packed examples (``data.packing``): where an example's tokens are is
    # then read from the position ids, else from the padding mask (see `note_padding`).
    packed: bool = False
    shared: list[nn.Module] = field(default_factory=list, repr=False)
    # The current forward's [B, T] shape and where its examples' real tokens are (see `note_padding`).
    padding: tuple[tuple[int, ...], Extent] | None = field(default=None, repr=False)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)
    _attention_modules: list[nn.Module] = field(default_factory=list, repr=False)
    # Per question about the attention mask (`key_only_mask`, `causal_key_mask`): the last mask it
    # looked at, and its answer.
    _mask_answers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    @contextmanager
    def shared_prefix(self) -> Iterator[Callable[[], AbstractContextManager[None]]]:
        """Compute what precedes the first random operation once for two forward passes.

        Everything up to the first dropping layer's attention scores is deterministic and identical
        in both passes of the KL compensation: the layers before it (half a decoder when dropout is
        confined to its latter half, the paper's setting) and that layer's query/key/value
        projections. Inside this context the first pass records each shared module's output; the
        returned context manager replays them in the second pass, whose shared modules then do no
        work. Gradients flow into the shared modules from both passes when both build graphs.
        """
        if not self.shared:
            yield nullcontext
            return
        recorded: dict[nn.Module, object] = {}
        handles = [module.register_forward_hook(lambda m, args, out: recorded.__setitem__(m, out)) for module in self.shared]

        def remove_hooks() -> None:
            for handle in handles:
                handle.remove()

        @contextmanager
        def replay() -> Iterator[None]:
            remove_hooks()
            # An instance-level forward (accelerate's device hooks set one) is put back afterwards.
            own_forwards = {module: vars(module).get("forward") for module in recorded}
            for module, output in recorded.items():
                module.forward = lambda *args, _output=output, **kwargs: _output
            try:
                yield
            finally:
                for module, forward in own_forwards.items():
                    if forward is None:
                        del module.forward
                    else:
                        module.forward = forward

        try:
            yield replay
        finally:
            remove_hooks()

    def key_only_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The model's [B, 1, Q, K] attention mask as [B, 1, 1, K] (True = attend) when every query
        sees the same keys, as under an encoder's padding mask; None when it differs between queries."""
        return self._once_per_mask("key_only", attention_mask, keys_of_every_query)

    def causal_key_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """A causal model's [B, 1, Q, K] mask as [B, 1, 1, K] (True = attend) when it is the causal
        triangle over the keys a padding mask leaves, left or right; None for any other mask
        (packed rows, a sliding window)."""
        return self._once_per_mask("causal_keys", attention_mask, keys_below_the_triangle)

    def _once_per_mask(self, question: str, attention_mask: torch.Tensor,
                       answer: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor | None:
        """``answer`` of the mask as booleans, decided once per forward: transformers hands every
        layer the same mask object."""
        asked = self._mask_answers.get(question)
        if asked is None or asked[0] is not attention_mask:
            asked = self._mask_answers[question] = (attention_mask, answer(as_visibility(attention_mask)))
        return asked[1]

    def token_extent(self, batch: int, length: int) -> Extent | None:
        """Where each example's real tokens are in the current forward's [batch, length] activations,
        when the batch is padded or packed (spans are drawn inside them); None when every row is
        one example and every position a token."""
        if self.padding is None or self.padding[0] != (batch, length):
            return None
        return self.padding[1]

    def note_padding(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: where the call's real tokens are, for the span patterns and
        NEFTune (found once per forward, read by every layer that needs it). Packed rows (transformers'
        packed-sequence format: no mask, position ids restarting at each example) are read from their
        [B, T] position ids, any other batch from its [B, T] padding mask."""
        if self.packed:
            where, extent = kwargs.get("position_ids"), packed_extent
        else:
            where, extent = kwargs.get("attention_mask"), token_extent
        self.padding = (tuple(where.shape), extent(where)) if where is not None and where.dim() == 2 else None

    def drops_token_spans(self, layer: int) -> bool:
        """Whether ``layer``'s feed-forward output loses a span of tokens, drawn over its length."""
        hidden = self.plan.active_positions.get("hidden")
        return hidden is not None and hidden.pattern == "span" and layer in self.layers

    def checkpoint_contexts(self) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        """``context_fn`` for `torch.utils.checkpoint`: a recomputed layer redraws the masks its
        forward drew.

        Checkpointing restores torch's default generators before it recomputes a layer in the
        backward pass, but not hkft's own; without this the recomputation would draw fresh masks and
        the gradient would belong to a different network than the loss. The forward context notes
        the generator state where the layer starts; the recompute context replays from there and
        then puts the stream back where it was.
        """
        start: dict = {}

        @contextmanager
        def forward() -> Iterator[None]:
            start.update(self.sampler.state_dict())
            yield

        @contextmanager
        def recompute() -> Iterator[None]:
            current = self.sampler.state_dict()
            self.sampler.load_state_dict(start)
            try:
                yield
            finally:
                self.sampler.load_state_dict(current)

        return forward(), recompute()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._attention_modules:
            delattr(module, ATTENTION_ATTRIBUTE)
        self._handles.clear()
        self._attention_modules.clear()

    def describe(self) -> dict[str, object]:
        return {
            "positions": {name: f"{drop.pattern} p={drop.rate:g}" for name, drop in self.plan.active_positions.items()},
            "compensation": self.plan.compensation,
            "kl_weight": self.plan.kl_weight,
            "branches": self.plan.branches,
            "layers": list(self.layers),
            "model_dropout": self.plan.model_dropout or 0.0,
            "neftune_alpha": self.plan.neftune_alpha,
        }


def shareable_prefix(model: nn.Module, plan: DropoutPlan) -> bool:
    """The layers before the first dropping one are deterministic only if nothing else is random:
    no input dropout or noise, none of the model's own dropout or router jitter, no LoRA dropout."""
    if "input" in plan.active_positions or plan.model_dropout or plan.neftune_alpha:
        return False
    return not architecture.has_training_noise(model)


def shared_modules(model: nn.Module, plan: DropoutPlan, stack: architecture.LayerStack, first: int, checkpointing: bool) -> list[nn.Module]:
    """What the KL's second pass replays from the first (see `DropoutController.shared_prefix`).

    Nothing when blocks are shared: a block run several times has no single output to replay. No
    whole layer when both passes train a mixture-of-experts model: the second pass's load-balancing
    loss reads every layer's router logits, which a replayed layer does not produce.
    """
    if stack.shared or not shareable_prefix(model, plan):
        return []
    routed = bool(getattr(architecture.transformers_model(model).config, "output_router_logits", False))
    shared = [] if routed and plan.compensation == "kl" and plan.branches == "both" else list(stack.blocks[:first])
    if not checkpointing:
        # Inside a checkpointed layer a replayed projection would be recomputed for real in the
        # backward pass, which checkpointing rejects (the saved tensors differ).
        shared += architecture.attention_input_projections(stack.blocks[first])
    return shared


def check_output_pattern(model: nn.Module, plan: DropoutPlan) -> None:
    """The pattern of the `output` position must be one the model's head takes (`patterns_for`)."""
    output = plan.active_positions.get("output")
    if output is not None and output.pattern not in patterns_for("output", architecture.reads_token_sequence(model)):
        raise ValueError(
            "positions.output: the span pattern drops a run of tokens, but a sequence classifier reads one "
            "vector per example; use the element or column pattern there"
        )


def instrument(model: nn.Module, plan: DropoutPlan, seed: int, rank: int = 0, *, packed: bool = False) -> DropoutController:
    """Apply ``plan`` to ``model`` (plain or peft-wrapped; wrap with LoRA first so hooks see the
    LoRA-adapted FFN output). ``packed``: the training batches are packed rows (``data.packing``)."""
    check_output_pattern(model, plan)
    stack = architecture.layer_stack(model)
    causal = architecture.is_causal_model(model)
    controller = DropoutController(plan=plan, sampler=MaskSampler(seed, rank), packed=packed)
    controller.layers = plan.layer_indices(stack.applications, causal)
    architecture.set_builtin_dropout(model, 0.0)
    if plan.model_dropout:
        # The method `dropout`: the model's own dropout in the selected layers, like every other
        # method (a decoder's latter half); with every layer selected, everywhere the model has it.
        every_layer = len(controller.layers) == stack.applications
        if stack.shared and not every_layer:
            raise ValueError("the method `dropout` sets the model's own dropout, and the layers of this model share one "
                             "block: use layers: all")
        for scope in [model] if every_layer else [stack.blocks[index] for index in controller.layers]:
            architecture.set_builtin_dropout(scope, plan.model_dropout)
    positions = plan.active_positions
    base = architecture.transformers_model(model)
    checkpointing = bool(getattr(base, "is_activation_checkpointing", False))
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False, "context_fn": controller.checkpoint_contexts})
    if controller.layers:
        controller.shared = shared_modules(model, plan, stack, controller.layers[0], checkpointing)

    if plan.neftune_alpha or any(drop.pattern == "span" for drop in positions.values()):
        controller._handles.append(base.register_forward_pre_hook(controller.note_padding, with_kwargs=True))

    # Each dropping block with the gate that says whether its current call is a selected layer.
    if stack.shared:
        applications = Applications()
        controller._handles.append(base.register_forward_pre_hook(applications.reset))
        controller._handles += [block.register_forward_pre_hook(applications.advance) for block in stack.blocks]
        dropping = [(block, applications.among(controller.layers)) for block in stack.blocks]
    else:
        dropping = [(stack.blocks[index], always) for index in controller.layers]

    attention_position = next((p for p in ("attention_logits", "attention_weights") if p in positions), None)
    if attention_position is not None:
        through_registry = base.config._attn_implementation != "eager" and architecture.uses_attention_interface(model)
        if through_registry:
            register_attention()
            base.set_attn_implementation(ATTENTION_NAME)
        for block, selected in dropping:
            module = architecture.attention_module(block)
            site = AttentionDrop(attention_position, positions[attention_position], controller, selected)
            setattr(module, ATTENTION_ATTRIBUTE, site)
            controller._attention_modules.append(module)
            if not through_registry:
                controller._handles += intercept_attention(module, site, causal)

    if "hidden" in positions:
        for block, selected in dropping:
            hook = FeatureDrop(positions["hidden"], controller, rescale=True, selected=selected)
            controller._handles.append(architecture.ffn_output_module(block).register_forward_hook(hook.output_hook))
    if "input" in positions:
        hook = FeatureDrop(positions["input"], controller, rescale=False)
        embeddings = architecture.transformers_model(model).get_input_embeddings()
        controller._handles.append(embeddings.register_forward_hook(hook.output_hook))
    if plan.neftune_alpha:
        noise = EmbeddingNoise(plan.neftune_alpha, controller)
        controller._handles.append(base.get_input_embeddings().register_forward_hook(noise.output_hook))
    if "output" in positions:
        hook = FeatureDrop(positions["output"], controller, rescale=True)
        controller._handles.append(architecture.head_module(model).register_forward_pre_hook(hook.input_hook))
    return controller
