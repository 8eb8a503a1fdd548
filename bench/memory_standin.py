"""The memory probe's Gleap stand-in, in a process of its own so that its memory is not the
daemon's: ``python -m bench.memory_standin --token T`` prints ``READY <url>`` and answers with
random faults (5xx, 429, answers lost after applying) and keeps no request log (an hour would
grow it). SIGUSR1 starts an outage (it stops answering, or with ``--down-status`` answers every
call with that status, as the soak's "Gleap down"), SIGUSR2 ends it; SIGTERM stops it."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

TOKEN = "probe-token-4c1e"


def main(argv: list[str] | None = None) -> int:
    from tests.gleap_standin import BackgroundFaults, GleapStandIn

    parser = argparse.ArgumentParser(prog="memory_standin")
    parser.add_argument("--token", default=TOKEN)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--fail", type=float, default=0.10, help="share of 5xx answers")
    parser.add_argument("--limit", type=float, default=0.05, help="share of 429 answers")
    parser.add_argument("--lose", type=float, default=0.02, help="share of lost answers (applied)")
    parser.add_argument("--down-status", type=int, default=None, help="an outage answers it")
    args = parser.parse_args(argv)

    # The soak's flaky Gleap (bench/soak_run.py), 503 only; no request log, which an hour would grow.
    standin = GleapStandIn(args.token, latency_seconds=args.latency, keep_log=False).start()
    standin.set_background_faults(
        BackgroundFaults(server_error=args.fail, rate_limited=args.limit, lost=args.lose, statuses=(503,))
    )
    outage = threading.Event()

    def on_usr(signum: int, frame: object) -> None:
        if signum == signal.SIGUSR1 and not outage.is_set():
            outage.set()
            if args.down_status is None:
                standin.stop()
            else:
                standin.set_down(args.down_status)
        elif signum == signal.SIGUSR2 and outage.is_set():
            outage.clear()
            if args.down_status is None:
                standin.start()
            else:
                standin.set_down(None)

    signal.signal(signal.SIGUSR1, on_usr)
    signal.signal(signal.SIGUSR2, on_usr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {standin.base_url}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
