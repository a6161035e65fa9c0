"""Fixtures of the chaos tests: the broker under test, its node, workers and a webhook."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chaos.helpers import (
    RABBIT_NODE,
    FreezableProxy,
    HookServer,
    RabbitNode,
    WorkerCluster,
)
from tests.conftest import AMQP_URL, broker_reachable


def _unavailable(message: str) -> None:
    """Skip the test locally; fail it under CI, where every service must be there."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def broker() -> str:
    """The URL of ``TRANSFORM_TEST_AMQP_URL``, checked on its own host and port."""
    parts = urlsplit(AMQP_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if not broker_reachable(host, port):
        _unavailable(f"RabbitMQ is not reachable on {host}:{port}")
    return AMQP_URL


@pytest.fixture(scope="session")
def rabbit_node(broker: str) -> RabbitNode:
    """The node of ``TRANSFORM_TEST_RABBITMQ_NODE``, once it is known to serve ``broker``.

    The check keeps a test from stopping a node other than the one the workers use,
    for example the shared default node when the URL points at a private one.
    """
    node = RabbitNode(RABBIT_NODE, broker)
    try:
        ports = node.amqp_ports()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"rabbitmqctl cannot reach node {RABBIT_NODE}: {exc}")
    if node.amqp_port not in ports:
        pytest.fail(
            f"node {RABBIT_NODE} listens on AMQP ports {sorted(ports)}, not on "
            f"{node.amqp_port} of TRANSFORM_TEST_AMQP_URL; set TRANSFORM_TEST_RABBITMQ_NODE "
            "to the node that serves that URL"
        )
    return node


@pytest.fixture(scope="session")
def disruptable_node(request: pytest.FixtureRequest) -> RabbitNode:
    """The node under test, for tests that close its connections or stop it.

    Outside CI the node must be named with ``TRANSFORM_TEST_RABBITMQ_NODE``, so that a
    local run of the whole suite never stops a node that other test runs share.
    """
    if not os.environ.get("CI") and "TRANSFORM_TEST_RABBITMQ_NODE" not in os.environ:
        pytest.skip(
            "this test stops RabbitMQ: set TRANSFORM_TEST_RABBITMQ_NODE (and "
            "TRANSFORM_TEST_AMQP_URL) to a node it may stop; CI uses rabbit@localhost"
        )
    node: RabbitNode = request.getfixturevalue("rabbit_node")
    return node


@pytest.fixture
def hook_server() -> Iterator[HookServer]:
    server = HookServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def cluster(tmp_path: Path, broker: str) -> AsyncIterator[WorkerCluster]:
    """Worker subprocesses of this test; all are killed and their topology deleted after."""
    workers = WorkerCluster(tmp_path, amqp_url=broker)
    yield workers
    await workers.close()


@pytest.fixture
async def broker_proxy(broker: str) -> AsyncIterator[FreezableProxy]:
    """A proxy in front of the broker that a test can freeze."""
    proxy = FreezableProxy(broker)
    await proxy.start()
    yield proxy
    await proxy.close()
