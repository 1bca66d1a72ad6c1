"""Benchmarks for hkft's dropout configurations: `python -m bench --help`."""
