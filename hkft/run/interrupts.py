"""Stop gracefully on SIGINT/SIGTERM: finish the step, write a checkpoint, then stop.

After the last step there is no step to finish: a signal then stops at once (KeyboardInterrupt),
and the adapter and results, written atomically, are rebuilt from the final checkpoint by --resume."""

from __future__ import annotations

import signal
from types import FrameType

from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """The first signal asks for a checkpoint and a clean stop; a second one stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._at_once = False

    def __enter__(self) -> StopOnSignal:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_at_once(self) -> None:
        """Training is over: from now on the first signal raises KeyboardInterrupt."""
        self._at_once = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None or self._at_once:
            self.received = self.received or signal.Signals(signum).name
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        """Leaving the loop ends the epoch early: its epoch-end evaluation would score a partial epoch
        that the uninterrupted run never scores, and could enter best-model selection. The step's
        checkpoint is already written."""
        if self.received is not None:
            control.should_evaluate = False
            control.should_save = False
        return control
