"""Studies over many runs: grids (`hkft sweep`), their comparison (`hkft compare`) and its plots.

This package calls the training recipe (`hkft.recipes.train`) and is never imported by it.
"""
