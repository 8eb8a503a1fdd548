"""One TLS context per process: a Gleap client per delivery pass, or an alert's webhook client,
loads no CA bundle of its own (audiencesync/tls.py)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from audiencesync import tls
from audiencesync.alerts.sender import WebhookSender
from audiencesync.config.alerts import AlertConfig
from audiencesync.config.loading import GleapConfig, Secret
from audiencesync.gleap.client import GleapClient
from tests.alert_receiver import AlertReceiver
from tests.conftest import TOKEN
from tests.gleap_standin import GleapStandIn


@pytest.fixture
def bundle_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Each CA bundle loaded into a context from now on (httpx loads one into each it makes)."""
    tls.client_context()  # the process's own, made on first use, before the count starts
    loads: list[Any] = []
    real = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    yield loads


def test_the_count_sees_a_client_that_makes_its_own_context(bundle_loads: list[Any]) -> None:
    # The seam the tests below rely on: httpx, given no context, loads a bundle into a new one.
    import httpx

    httpx.Client().close()
    assert len(bundle_loads) == 1


def test_each_pass_s_gleap_client_uses_the_process_s_context(
    gleap: GleapStandIn, bundle_loads: list[Any]
) -> None:
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=3)

    async def one_pass(user_id: str) -> bool:
        async with GleapClient(settings, Secret(TOKEN)) as client:
            return (await client.identify(user_id, {"vip": True})).ok

    # Each pass runs in an event loop of its own, as the delivery loop's do.
    assert asyncio.run(one_pass("u1")) and asyncio.run(one_pass("u2"))
    assert len(gleap.requests) == 2
    assert bundle_loads == []


def test_an_alert_s_webhook_client_uses_the_process_s_context(bundle_loads: list[Any]) -> None:
    with AlertReceiver() as receiver:
        for n in range(2):
            sender = WebhookSender(AlertConfig(url=Secret(receiver.url())))
            sender.put(b'{"n": %d}' % n)
            assert sender.close(time.monotonic() + 30) == 0
        assert len(receiver.posts()) == 2
    assert bundle_loads == []


def test_the_context_verifies_certificates_and_host_names() -> None:
    context = tls.client_context()
    assert context is tls.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
