"""One quick look at the network before the Hugging Face hub is used.

huggingface_hub retries an unreachable hub five times with growing pauses (ten lines of warnings
over 25-35 s) before it falls back to the local cache. A single short connection attempt decides
instead: when the hub (or the proxy in front of it) cannot be reached, the process switches to
offline mode, so cached models and datasets still load and anything else fails at once, in one line.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import urllib.request
from urllib.parse import urlsplit

import huggingface_hub.constants as hub_constants

PROBE_TIMEOUT_S = 3.0
DEFAULT_PORTS = {"https": 443, "http": 80}


@functools.cache
def offline_unless_hub_reachable() -> bool:
    """True when the hub is not to be contacted (offline mode set, or just switched on)."""
    if hub_constants.HF_HUB_OFFLINE:
        return True
    if _reachable(hub_constants.ENDPOINT):
        return False
    hub_constants.HF_HUB_OFFLINE = True  # read by huggingface_hub (and transformers through it) at every call
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "datasets" in sys.modules:  # datasets copies the setting when imported
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True


def _reachable(endpoint: str) -> bool:
    url = urlsplit(endpoint)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else urllib.request.getproxies().get(url.scheme)
    target = urlsplit(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else url
    try:
        port = target.port or DEFAULT_PORTS.get(target.scheme, 443)
        with socket.create_connection((target.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False
