"""The hub probe: reachability is a real TCP connect, and the offline switch is set only while needed."""

import socket

import pytest
from huggingface_hub import constants

from kdlab.models import hub


@pytest.fixture
def endpoint(monkeypatch):
    """Point the hub endpoint at a local port and turn offline mode off; the probe's cache is cleared around it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub.hub_reachable.cache_clear()

    def point_at(port: int) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        hub.hub_reachable.cache_clear()

    yield point_at
    hub.hub_reachable.cache_clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_listening_endpoint_is_reachable_and_a_closed_one_is_not(endpoint):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint(server.getsockname()[1])
        assert hub.hub_reachable()
    endpoint(_free_port())
    assert not hub.hub_reachable()


def test_offline_mode_counts_as_unreachable_without_a_probe(endpoint, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed while offline"))
    assert not hub.hub_reachable()


def test_the_offline_switch_is_on_inside_the_block_only_when_unreachable(endpoint):
    import datasets.config

    endpoint(_free_port())
    with hub.offline_unless_reachable() as reachable:
        assert not reachable and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert constants.HF_HUB_OFFLINE is False
