"""The run folder and what writes into it: atomic files, the run directory, interrupts, progress, tracking."""
