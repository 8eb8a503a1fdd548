"""`audiencesync alert-test`: post a test message to each [[alerts]] webhook and say what each answered.

It needs no store and no Gleap token: it checks only that the webhooks take a message.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from audiencesync.alerts.messages import NOTICE, Alert, render
from audiencesync.alerts.sender import TIMEOUT_SECONDS, WebhookSender
from audiencesync.cli.output import EXIT_INCOMPLETE, EXIT_OK
from audiencesync.config.loading import Config
from audiencesync.errors import ConfigError
from audiencesync.store.database import utc_now

EPILOG = """\
Each webhook gets one POST, in its own format, without retries. Exit status 0 when
every webhook answered 2xx, 1 otherwise.

example:
  audiencesync --config /etc/audiencesync.toml alert-test
"""


def add_alert_commands(commands: Any) -> None:
    test = commands.add_parser(
        "alert-test",
        help="send a test message to each [[alerts]] webhook and show what each answered",
        description="Send a test message to each webhook configured under [[alerts]].",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"how long to wait for each webhook's answer (default: {TIMEOUT_SECONDS:g}; e.g. --timeout 10)",
    )
    test.set_defaults(handler=cmd_alert_test)


def cmd_alert_test(args: argparse.Namespace, config: Config) -> int:
    if not config.alerts:
        raise ConfigError(
            "no webhook is configured", path=str(config.path), fix='add an [[alerts]] table with url = "..."'
        )
    host = socket.gethostname()
    alert = Alert(
        "test",
        NOTICE,
        "test",
        # The host is the alert's own field: Slack's text starts "audiencesync on HOST:" already.
        "a test message from `audiencesync alert-test`: this webhook is set up",
        utc_now(),
        host,
    )
    status = EXIT_OK
    token = config.gleap.api_token
    for number, webhook in enumerate(config.alerts, start=1):
        body = render(alert, webhook.format, [token.reveal()] if token is not None else [])
        answer = WebhookSender(webhook, timeout=args.timeout).send(body)
        print(f"[[alerts]] #{number} {webhook.shown_url} ({webhook.format}): {answer}")
        if not answer.ok:
            status = EXIT_INCOMPLETE
    if status != EXIT_OK:
        print(
            "audiencesync: error: a webhook did not take the test message. Fix: check its url, headers "
            "and format in the config (and the variables they name)",
            file=sys.stderr,
        )
    return status
