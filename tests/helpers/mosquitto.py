"""pytest plumbing around the library's broker launcher (``daemon.broker.Mosquitto``).

Use the class directly (sync or async context manager) or the fixtures::

    from daemon.broker import Mosquitto
    from helpers.mosquitto import mosquitto  # noqa: F401  (the import registers the fixture)

    def test_x(mosquitto: Mosquitto) -> None:
        ...connect to mosquitto.host, mosquitto.port...

    with Mosquitto(tmp_path, max_packet_size=4096) as broker:
        broker.stop(); broker.start()     # same port again (reconnect tests)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.broker import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker per test (start takes ~10 ms) on a free port."""
    with Mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="module")
def mosquitto_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker shared by a test module; tests must use unique topics (e.g. a per-test prefix)."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker
