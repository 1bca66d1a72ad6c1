"""A stop asked for by a signal: a checkpoint at the step, nothing the uninterrupted run would not do."""

from transformers import TrainingArguments
from transformers.trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    TrainerControl,
    TrainerState,
)

from hkft.run.interrupts import StopOnSignal


def test_a_stop_mid_epoch_saves_the_step_and_skips_the_epoch_end_evaluation(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", save_strategy="epoch", report_to=[])
    stopper = StopOnSignal()
    handler = CallbackHandler([DefaultFlowCallback, stopper], None, None, None, None)
    state = TrainerState(global_step=12, max_steps=32)

    control = handler.on_epoch_end(args, state, TrainerControl())
    assert control.should_evaluate and control.should_save  # an ordinary epoch end

    stopper.received = "SIGINT"
    control = handler.on_step_end(args, state, TrainerControl())
    assert control.should_save and control.should_training_stop
    control = handler.on_epoch_end(args, state, TrainerControl())
    assert not control.should_evaluate and not control.should_save
