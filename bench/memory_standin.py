"""The memory probe's Gleap stand-in, in a process of its own so that its memory is not the
daemon's: ``python -m bench.memory_standin --token T`` prints ``READY <url>`` and answers with
random faults (5xx, 429, answers lost after applying) and keeps no request log (an hour would
grow it). SIGUSR1 starts an outage (it stops answering, or with ``--down-status`` answers every
call with that status, as the soak's "Gleap down"), SIGUSR2 ends it; SIGTERM stops it."""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
from collections import deque
from typing import Any

TOKEN = "probe-token-4c1e"


def main(argv: list[str] | None = None) -> int:
    from tests.gleap_standin import GleapStandIn, _Faults, _text_reply

    parser = argparse.ArgumentParser(prog="memory_standin")
    parser.add_argument("--token", default=TOKEN)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--fail", type=float, default=0.10, help="share of 5xx answers")
    parser.add_argument("--limit", type=float, default=0.05, help="share of 429 answers")
    parser.add_argument("--lose", type=float, default=0.02, help="share of lost answers (applied)")
    parser.add_argument("--down-status", type=int, default=None, help="an outage answers it")
    args = parser.parse_args(argv)

    class Faulty(GleapStandIn):
        """Random faults on top of the scripted ones; keeps no request log (an hour would grow it)."""

        def _faults(self, fail: tuple[deque[Any], ...], lose: tuple[deque[Any], ...]) -> _Faults:
            faults = super()._faults(fail, lose)
            if faults.drop or faults.failure or faults.limited or faults.lost:
                return faults
            r = random.random()
            if r < args.fail:
                return _Faults(faults.delay, False, _text_reply(503, "busy"), False, 200, {}, False)
            if r < args.fail + args.limit:
                return _Faults(faults.delay, False, None, False, 200, {}, True)
            if r < args.fail + args.limit + args.lose:
                return _Faults(faults.delay, False, None, True, 200, {}, False)
            return faults

        def _record(self, seq: int, request: Any) -> None:
            pass

        def _contacts_changed(self) -> None:
            with self._lock:
                self._identify_calls.clear()
                self._track_calls.clear()

    standin = Faulty(args.token, latency_seconds=args.latency).start()
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
