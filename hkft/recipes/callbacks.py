"""What hkft adds to the Trainer's loop that a callback can do: the checkpoints' file modes.

The overfitting monitor (`monitor.py`), progress (`hkft.run.progress`), signals
(`hkft.run.interrupts`) and a tuning trial's pruner are callbacks too; `trainer.py` keeps only what
must change the Trainer's own steps.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hkft.run.files import default_file_modes


class CheckpointFileModes(TrainerCallback):
    """The Trainer writes the adapter with safetensors, as 0600: each checkpoint gets the modes of the
    user's other files once it is saved."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if args.should_save:
            default_file_modes(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
