"""HkftTrainer leans on a few private names of transformers' Trainer: each must still exist in the
installed transformers, or this test says which one is gone (before a training run fails obscurely)."""

import inspect
import re

import pytest
import transformers
from transformers import Trainer

from hkft.recipes.trainer import TRAINER_PRIVATE_ATTRIBUTES, TRAINER_PRIVATE_METHODS


@pytest.mark.parametrize("name", TRAINER_PRIVATE_METHODS)
def test_trainer_still_has_the_private_method(name):
    assert callable(getattr(Trainer, name, None)), (
        f"transformers {transformers.__version__} has no Trainer.{name}: hkft/recipes/trainer.py overrides it; "
        "adapt HkftTrainer or install the transformers version in constraints.txt")


def trainer_source() -> str:
    return "\n".join(inspect.getsource(module) for module in {inspect.getmodule(cls) for cls in Trainer.__mro__}
                     if module is not None and module.__name__.startswith("transformers"))


@pytest.mark.parametrize("name", TRAINER_PRIVATE_ATTRIBUTES)
def test_trainer_still_sets_the_private_attribute(name):
    assert f"self.{name} " in trainer_source() or f"self.{name}=" in trainer_source(), (
        f"transformers {transformers.__version__}'s Trainer no longer sets self.{name}: hkft/recipes/trainer.py reads it; "
        "adapt HkftTrainer or install the transformers version in constraints.txt")


def test_the_lists_name_every_private_trainer_name_hkft_uses():
    """A private name hkft/recipes/trainer.py takes from Trainer but leaves off the lists would go unchecked:
    every `super()._x`, and every `self._x` that hkft/recipes/trainer.py neither defines nor assigns."""
    import hkft.recipes.trainer

    source = inspect.getsource(hkft.recipes.trainer)
    defined = set(re.findall(r"def (_[a-z][a-z_]*)\(", source)) | set(re.findall(r"self\.(_[a-z][a-z_]*) *(?::[^=]*)?= ", source))
    borrowed = set(re.findall(r"super\(\)\.(_[a-z][a-z_]*)", source))
    borrowed |= set(re.findall(r"self\.(_[a-z][a-z_]*)", source)) - defined
    assert borrowed - set(TRAINER_PRIVATE_METHODS) - set(TRAINER_PRIVATE_ATTRIBUTES) == set()
