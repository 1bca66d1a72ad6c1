"""Benchmarks for hkft's dropout configurations: `python -m bench --help`."""

# hkft first: importing it quiets bitsandbytes' warning about its optional hub kernel, which peft's
# import (in the plain baselines) would otherwise print before any hkft module is loaded.
import hkft  # noqa: F401
