"""Reaching the Hugging Face hub: a fast reachability probe and an offline switch.

Without a network, `datasets` and `huggingface_hub` retry each request with back-off (about 25 s per dataset, with a
warning per retry) before failing deep inside a download. kdlab probes the hub once (a TCP connect with a short
timeout) and, when it cannot be reached, loads in offline mode: a cached copy still loads, and a missing one fails at
once, so start-up can report one clear error instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Iterator
from urllib.parse import urlparse


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when offline mode is off and a TCP connection to the hub endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within the block, hub libraries run offline (cache only) when the hub cannot be reached; yields reachability."""
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
