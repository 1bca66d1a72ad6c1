"""The compensation losses against hand computations, and the trainer's use of them."""

import math

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model

from hkft.dropout import instrument
from hkft.dropout.methods import build_plan
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.registry import task_for


def test_symmetric_kl_equals_hand_computation():
    # P = softmax([0, ln 3]) = (1/4, 3/4); Q = softmax([0, 0]) = (1/2, 1/2)
    p, q = (0.25, 0.75), (0.5, 0.5)
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    target = torch.tensor([[0.0, 0.0]])
    got = task_for("classification").consistency_loss(logits, target)
    assert got.item() == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-6)
    one_way = task_for("classification").consistency_loss(logits, target, symmetric=False)
    assert one_way.item() == pytest.approx(kl_pq, rel=1e-6)


def test_causal_lm_kl_counts_only_supervised_next_tokens():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    got = task_for("causal-lm").consistency_loss(logits, target, labels=labels)
    rows = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    expected = 0.0
    for b, t in rows:
        lp, lq = torch.log_softmax(logits[b, t], -1), torch.log_softmax(target[b, t], -1)
        expected += 0.5 * ((lp.exp() * (lp - lq)).sum() + (lq.exp() * (lq - lp)).sum()).item()
    assert got.item() == pytest.approx(expected / len(rows), rel=1e-5)


def test_regression_consistency_is_gaussian_kl():
    got = task_for("regression").consistency_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [2.5]]))
    assert got.item() == pytest.approx((0.5 * 1.0 + 0.5 * 0.25) / 2)


def test_accumulated_halves_equal_one_big_batch():
    torch.manual_seed(1)
    logits, target = torch.randn(8, 3), torch.randn(8, 3)
    whole = task_for("classification").consistency_loss(logits, target)
    halves = sum(task_for("classification").consistency_loss(logits[i : i + 4], target[i : i + 4], num_items=8) for i in (0, 4))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def make_trainer(training_args, method: str, branches: str = "one", kl_weight: float = 1.0):
    model = tiny_model("bert", "classification")
    plan = build_plan(method, 0.2, kl_weight, branches=branches)
    controller = instrument(model, plan, seed=0)
    data = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "attention_mask": [[1] * 4] * 4, "labels": [0, 1, 2, 0]})
    args = training_args(per_device_train_batch_size=4)
    trainer = HkftTrainer(model=model, args=args, train_dataset=data, dropout=controller, task=task_for("classification"))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]] * 4), "attention_mask": torch.ones(4, 4, dtype=torch.long),
              "labels": torch.tensor([0, 1, 2, 0])}
    return trainer, model, controller, inputs


def count_grad_forwards(model):
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("branches,expected", [("one", [True, False]), ("both", [True, True])])
def test_kl_branches_build_graphs_only_where_asked(branches, expected, training_args):
    trainer, model, _, inputs = make_trainer(training_args, "hiddenkey", branches)
    calls = count_grad_forwards(model)
    model.train()
    trainer.compute_loss(model, inputs)
    assert calls == expected


def test_one_branch_loss_equals_hand_computation_with_the_same_masks(training_args):
    trainer, model, controller, inputs = make_trainer(training_args, "hiddenkey", kl_weight=0.7)
    model.train()
    state = controller.state_dict()
    loss = trainer.compute_loss(model, inputs)
    controller.load_state_dict(state)
    first = model(**inputs)
    with torch.no_grad():
        second = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = first.loss + 0.7 * task_for("classification").consistency_loss(first.logits, second)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert trainer._logged_terms["kl_loss"][-1] > 0


def test_js_target_is_the_pass_without_masks(training_args):
    trainer, model, controller, inputs = make_trainer(training_args, "hiddenkey")
    trainer.dropout.plan = build_plan("hiddenkey", 0.2, 1.0, compensation="js")
    model.train()
    state = controller.state_dict()
    loss = trainer.compute_loss(model, inputs)
    controller.load_state_dict(state)
    first = model(**inputs)
    model.eval()
    clean = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = first.loss + task_for("classification").consistency_loss(first.logits, clean, symmetric=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_js_target_is_the_eval_mode_model_even_with_the_models_own_dropout(training_args):
    """`js` compares the dropout pass with the eval-mode pass: the model's own dropout (the
    `dropout` method, or peft's lora_dropout) must be off in the target too, not only hkft's masks."""
    model = tiny_model("bert", "classification")
    controller = instrument(model, build_plan("dropout", 0.3, 1.0, compensation="js"), seed=0)
    args = training_args()
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("classification"))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]] * 4), "attention_mask": torch.ones(4, 4, dtype=torch.long),
              "labels": torch.tensor([0, 1, 2, 0])}
    model.train()
    torch.manual_seed(3)  # the model's own dropout draws from torch's generator
    loss = trainer.compute_loss(model, inputs)
    assert model.training
    torch.manual_seed(3)
    first = model(**inputs)
    model.eval()
    clean = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = first.loss + task_for("classification").consistency_loss(first.logits, clean, symmetric=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("method", ["hiddenkey", "hiddenkey-"])
def test_accumulation_divides_the_task_loss_and_the_kl_alike(method, training_args):
    """Classification heads accept **kwargs but return the mean over their micro-batch, not a sum
    over the accumulation window: each of two accumulated micro-batches must count half of its task
    loss and half of its KL, so that kl_weight means the same at any grad_accum and device count."""
    trainer, model, controller, inputs = make_trainer(training_args, method, kl_weight=0.7)
    model.train()
    state = controller.state_dict()
    _, whole_window = loss_and_gradients(trainer, model, inputs, None)
    controller.load_state_dict(state)
    trainer.current_gradient_accumulation_steps = 2
    _, num_items = trainer.get_batch_samples(iter([inputs, inputs]), 2, torch.device("cpu"))
    trainer.training_step(model, dict(inputs), num_items)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(grads, {name: grad / 2 for name, grad in whole_window.items()})


def test_rescale_methods_use_the_plain_loss(training_args):
    trainer, model, _, inputs = make_trainer(training_args, "hiddenkey-")
    calls = count_grad_forwards(model)
    model.train()
    trainer.compute_loss(model, inputs)
    assert calls == [True]


def test_dropout_rng_state_travels_with_checkpoints(tmp_path, training_args):
    trainer, model, controller, inputs = make_trainer(training_args, "hiddenkey")
    model.train()
    model(**inputs)
    trainer._save_rng_state(str(tmp_path))
    expected = model(**inputs).logits
    model(**inputs)  # advance the stream further
    trainer._load_rng_state(str(tmp_path))
    assert torch.equal(model(**inputs).logits, expected)


def decoder_trainer(training_args, branches: str, share: bool, arch: str = "llama"):
    task = "causal-lm" if arch == "llama" else "classification"
    model = tiny_model(arch, task)
    controller = instrument(model, build_plan("hiddenkey", 0.2, 1.0, branches=branches), seed=0)
    if not share:
        controller.shared = []
    args = training_args()
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for(task))
    return trainer, model, controller


# Decoder: latter-half dropout in 4 layers shares layers 0 and 1 and layer 2's input projections.
# Encoder: dropout in every layer still shares layer 0's input projections (its input is the embeddings).
SHARED = {
    "llama": ["model.layers.0", "model.layers.1", *(f"model.layers.2.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))],
    "bert": [f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")],
}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("branches", ["one", "both"])
def test_shared_prefix_gives_the_same_loss_and_gradients(branches, arch, training_args):
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    inputs["labels"] = inputs["input_ids"].clone() if arch == "llama" else torch.tensor([0, 2])
    results = []
    for share in (True, False):
        trainer, model, controller = decoder_trainer(training_args, branches, share, arch)
        model.train()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        shared = [name for name, module in model.named_modules() if any(module is m for m in controller.shared)]
        results.append((loss.detach(), grads, shared))
    (shared_loss, shared_grads, shared), (plain_loss, plain_grads, _) = results
    assert shared == SHARED[arch]
    assert torch.allclose(shared_loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared_grads, plain_grads))


def test_shared_prefix_skips_the_prefix_in_the_second_pass(training_args):
    trainer, model, controller = decoder_trainer(training_args, "one", share=True)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append(0))
    model.model.layers[3].mlp.register_forward_pre_hook(lambda m, a: calls.append(3))
    keys = []
    model.model.layers[2].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
              "labels": torch.tensor([[5, 6, 7, 8]])}
    model.train()
    trainer.compute_loss(model, inputs)
    assert calls.count(0) == 1 and calls.count(3) == 2  # the shared layer computed once, the dropping one twice
    assert len(keys) == 2 and keys[1] is keys[0]  # the first dropping layer's keys: replayed, not recomputed
    assert "forward" not in vars(model.model.layers[0])  # the replay is undone
    assert "forward" not in vars(model.model.layers[2].self_attn.k_proj)


def reference_kl(a: torch.Tensor, b: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Plain autograd: log-softmax, KL per row, summed."""
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (0.5 * (kl_pq + kl_qp) if symmetric else kl_pq).sum()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("target_grad", [True, False])
def test_chunked_kl_gradients_match_autograd(monkeypatch, symmetric, target_grad):
    import hkft.dropout.compensation as consistency

    monkeypatch.setattr(consistency, "CHUNK_ELEMENTS", 40)  # several chunks of 4 rows
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 11, requires_grad=True)
    target = torch.randn(2, 9, 11, requires_grad=target_grad)
    labels = torch.randint(0, 11, (2, 9))
    labels[0, :4] = -100
    loss = task_for("causal-lm").consistency_loss(logits, target, labels=labels, symmetric=symmetric, num_items=7)
    loss.backward()

    ref_logits = logits.detach().clone().requires_grad_()
    ref_target = target.detach().clone().requires_grad_(target_grad)
    supervised = labels[:, 1:] != -100
    expected = reference_kl(ref_logits[:, :-1][supervised], ref_target[:, :-1][supervised], symmetric) / 7
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
    if target_grad:
        assert torch.allclose(target.grad, ref_target.grad, atol=1e-6)
    else:
        assert target.grad is None


def test_one_branch_kl_sends_no_gradient_to_the_target():
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3, requires_grad=True)
    task_for("classification").consistency_loss(logits, target.detach()).backward()
    assert logits.grad is not None and target.grad is None


def reference_task_and_kl(model, inputs, controller, branches, compensation, smoothing, num_items):
    """The unfused objective with plain autograd: the model's own loss (or transformers'
    LabelSmoother), a second pass with the masks the trainer drew next, and `reference_kl`."""
    from transformers.trainer_pt_utils import LabelSmoother

    labels = inputs["labels"]
    forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    first = model(**forward_inputs)
    smoother = LabelSmoother(epsilon=smoothing)

    def task(logits):
        return smoother({"logits": logits}, labels, shift_labels=True, num_items_in_batch=num_items)

    if branches == "both":
        second = model(**forward_inputs).logits
        task_loss = 0.5 * (task(first.logits) + task(second))
    else:
        model.train(compensation != "js")  # the js target is the eval-mode model
        with torch.no_grad():
            second = model(**forward_inputs).logits
        model.train()
        task_loss = task(first.logits)
    supervised = labels[:, 1:] != -100
    kl = reference_kl(first.logits[:, :-1][supervised], second[:, :-1][supervised], compensation == "kl") / num_items
    return task_loss, kl


def decoder_batch_with_prompts() -> dict[str, torch.Tensor]:
    """Two rows of six tokens whose first tokens (and one last token) are unsupervised: 8 next tokens carry a label."""
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4]]), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    inputs["labels"] = inputs["input_ids"].masked_fill(torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]]).bool(), -100)
    return inputs


def loss_and_gradients(trainer, model, inputs, num_items) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads


def assert_same_gradients(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(
    "branches,compensation,smoothing",
    [("one", "kl", 0.0), ("both", "kl", 0.0), ("one", "js", 0.0), ("one", "kl", 0.1), ("both", "kl", 0.1)],
)
def test_fused_causal_lm_objective_equals_the_unfused_loss_and_gradients(monkeypatch, branches, compensation, smoothing, training_args):
    import hkft.dropout.compensation as consistency

    monkeypatch.setattr(consistency, "CHUNK_ELEMENTS", 128 * 3)  # chunks of 3 rows of the 128-token vocabulary
    model = tiny_model("llama")
    plan = build_plan("hiddenkey", 0.2, 0.7, branches=branches, compensation=compensation)
    controller = instrument(model, plan, seed=0)
    args = training_args(label_smoothing_factor=smoothing)
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))
    inputs = decoder_batch_with_prompts()
    model.train()
    state = controller.state_dict()
    loss, fused_grads = loss_and_gradients(trainer, model, inputs, torch.tensor(7))

    controller.load_state_dict(state)
    task_loss, kl = reference_task_and_kl(model, inputs, controller, branches, compensation, smoothing, 7)
    expected = task_loss + 0.7 * kl
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer._logged_terms["task_loss"][-1] == pytest.approx(task_loss.item(), rel=1e-5)
    assert trainer._logged_terms["kl_loss"][-1] == pytest.approx(kl.item(), rel=1e-5)
    assert_same_gradients(fused_grads, {name: p.grad for name, p in model.named_parameters() if p.grad is not None})


def test_fused_objective_normalises_like_the_model_loss_without_an_item_count(training_args):
    model = tiny_model("llama")
    controller = instrument(model, build_plan("hiddenkey", 0.0, 1.0), seed=0)  # rate 0: both passes equal, KL 0
    args = training_args()
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
              "labels": torch.tensor([[-100, 6, 7, 8]])}
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    assert loss.item() == pytest.approx(model(**inputs).loss.item(), rel=1e-6)  # the mean over supervised tokens
    assert trainer._logged_terms["kl_loss"][-1] == pytest.approx(0.0, abs=1e-7)


def test_segments_are_runs_of_consecutive_rows_cut_at_the_chunk_size():
    from hkft.dropout.compensation import _segments

    rows = torch.tensor([0, 1, 2, 3, 4, 7, 8, 10])
    segments = _segments(rows, step=2)
    assert segments == [(0, 0, 2), (2, 2, 4), (4, 4, 5), (5, 7, 9), (7, 10, 11)]
    covered = torch.cat([torch.arange(first, end) for _, first, end in segments])
    assert torch.equal(covered, rows)
    assert [rows[offset].item() for offset, _, _ in segments] == [first for _, first, _ in segments]
    assert _segments(torch.tensor([], dtype=torch.long), step=2) == []


def test_the_lm_head_runs_on_supervised_positions_only(training_args):
    trainer, model, _ = decoder_trainer(training_args, "one", share=True)
    head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(out.shape))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    inputs["labels"] = inputs["input_ids"].masked_fill(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool(), -100)
    model.train()
    trainer.compute_loss(model, inputs)
    assert head_rows == [torch.Size([5, 128])] * 2  # next tokens 3, 4 of the first row and 2, 3, 4 of the second
    model(**inputs)
    assert head_rows[-1] == torch.Size([2, 5, 128])  # the hook is gone after the step


@pytest.mark.parametrize("method,smoothing,num_items", [("none", 0.0, 7), ("hiddenkey-", 0.0, None), ("hiddenkey-", 0.1, 7)])
def test_single_pass_causal_lm_loss_equals_the_stock_trainer_loss_and_gradients(monkeypatch, method, smoothing, num_items, training_args):
    """Without a compensation term a causal LM still gets the chunked cross-entropy (head on the
    supervised rows, gradient written in the forward pass): same loss and gradients as the Trainer's."""
    from transformers import Trainer

    import hkft.dropout.compensation as consistency

    monkeypatch.setattr(consistency, "CHUNK_ELEMENTS", 128 * 3)
    model = tiny_model("llama")
    controller = instrument(model, build_plan(method, 0.2, 0.0), seed=0)
    args = training_args(label_smoothing_factor=smoothing)
    inputs = decoder_batch_with_prompts()
    model.train()
    count = None if num_items is None else torch.tensor(num_items)

    state = controller.state_dict()
    head_rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(out.shape[0]))
    hkft_trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))
    loss, grads = loss_and_gradients(hkft_trainer, model, inputs, count)
    assert head_rows == [8]  # the supervised next tokens, not the 2 x 6 positions
    handle.remove()
    controller.load_state_dict(state)  # the stock Trainer's pass draws the same masks
    expected, expected_grads = loss_and_gradients(Trainer(model=model, args=args), model, inputs, count)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(grads, expected_grads)


@pytest.mark.parametrize("method", ["hiddenkey-", "hiddenkey"])
def test_chunked_loss_keeps_a_mixture_of_experts_load_balancing_loss(method, training_args):
    """The chunked loss calls the model without labels, so the model does not add its router loss
    itself; the trainer must (at rate 0 the KL term is 0 and the loss is the model's own)."""
    from transformers import Trainer

    model = tiny_model("mixtral")
    controller = instrument(model, build_plan(method, 0.0, 1.0), seed=0)
    args = training_args()
    inputs = decoder_batch_with_prompts()
    model.train()
    count = torch.tensor(8)
    hkft_trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))
    loss, grads = loss_and_gradients(hkft_trainer, model, inputs, count)
    expected, expected_grads = loss_and_gradients(Trainer(model=model, args=args), model, inputs, count)
    assert model(**inputs).aux_loss > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(grads, expected_grads)


def scaled_fp16_loss_and_gradients(trainer, model, inputs, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What GradScaler does under fp16 autocast: backward of loss * scale, gradients divided back."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=None)
    (loss * scale).backward()
    grads = {name: p.grad / scale for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads


@pytest.mark.parametrize("method", ["hiddenkey-", "hiddenkey"])
def test_fused_causal_lm_objective_under_fp16_autocast_and_loss_scaling(method, training_args):
    """GradScaler's first scale is 2**16, beyond float16's range: a logit gradient stored in float16
    before the scale is applied overflows on the first step, and its small entries flush to zero.
    Gradients must be finite and match the stock loss (hiddenkey-: one pass) or the same objective
    in float32 (hiddenkey: two passes and the KL) with the same masks."""
    from transformers import Trainer

    model = tiny_model("llama")
    controller = instrument(model, build_plan(method, 0.2, 0.0), seed=0)
    args = training_args()
    inputs = decoder_batch_with_prompts()
    model.train()
    state = controller.state_dict()
    hkft_trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))
    loss, grads = scaled_fp16_loss_and_gradients(hkft_trainer, model, inputs, 2.0 ** 16)
    controller.load_state_dict(state)
    if method == "hiddenkey-":
        expected, expected_grads = scaled_fp16_loss_and_gradients(Trainer(model=model, args=args), model, inputs, 2.0 ** 16)
    else:
        expected, expected_grads = loss_and_gradients(hkft_trainer, model, inputs, None)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():  # float16 arithmetic in the model itself: about 1e-3 apart
        error = (grad - expected_grads[name]).norm() / expected_grads[name].norm()
        assert error < 1e-2, (name, float(error))
