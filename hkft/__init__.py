"""hkft: LoRA and QLoRA finetuning with HiddenKey and the unified dropout framework."""

import importlib.abc
import logging
import sys

__version__ = "0.1.0"


class _HubProbeBeforeBitsandbytes(importlib.abc.MetaPathFinder):
    """Decides offline mode (hkft.hub) the moment bitsandbytes is first imported, by peft or by hkft.

    bitsandbytes 0.50 fetches an optional CPU 4-bit kernel from the Hugging Face hub at import time.
    On a machine without network that costs about 40 s of retries inside ``import peft``, before
    hkft's own hub probe would run. Probing first makes the fetch fail at once; bitsandbytes then
    uses the 4-bit kernel of its own native library.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "bitsandbytes":
            sys.meta_path.remove(self)
            from hkft.hub import offline_unless_hub_reachable

            offline_unless_hub_reachable()
        return None  # the regular finders import the module


if "bitsandbytes" not in sys.modules:
    sys.meta_path.insert(0, _HubProbeBeforeBitsandbytes())

# bitsandbytes warns on import about its optional hub kernel (and `kernels`, which fetches it, about
# offline mode); hkft never uses that kernel, and stderr is kept for hkft's own one-line errors.
for _noisy_logger in ("bitsandbytes", "kernels"):
    logging.getLogger(_noisy_logger).setLevel(logging.ERROR)
