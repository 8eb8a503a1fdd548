"""Regenerate docs/web-*.png: the status page on the demo data, in each state attention.py names.

    python scripts/web_screenshot.py [--keep DIR]

It builds the demo source (examples/make_demo_source.py) and a store in a scratch directory,
syncs config.example.toml's audiences against the loopback Gleap stand-in of the tests
(tests/gleap_standin/: no real Gleap, no token) for a day of cycles two hours apart, with
orders coming and going between them, then starts the daemon (`audiencesync run`, which catches
up at once) and photographs the pages it serves in headless Chromium (/usr/bin/chromium,
chromedriver), one per state, each brought about as it happens in life and ended by its fix:

    docs/web-state-ok.png             everything delivered
    docs/web-state-delivering.png     a full sync delivering (the stand-in holds Gleap's answers)
    docs/web-state-parked.png         Gleap refuses one user (422): parked (also web-overview.png,
                                      and web-audience.png, the audience's page)
    docs/web-state-held.png           the orders table emptied: the audience's page, held
    docs/web-state-token_refused.png  the stand-in's token rotated: every call 401
    docs/web-state-gleap_down.png     every call 503: the circuit breaker opens
    docs/web-state-overdue.png        the daemon stopped, its next runs past (`audiencesync serve`)

Each refresh is a `sync --full`, which the running daemon carries out. With --keep DIR the demo
store stays there, for `audiencesync --config DIR/config.toml serve`.

    python scripts/web_screenshot.py --keep DIR --store-only

builds the demo store in DIR and stops there: no daemon, no browser, no screenshots, and
nothing but audiencesync itself (`pip install -e .`) is needed. The screenshots need the dev
extra (`pip install -e '.[dev]'`: selenium) and Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from audiencesync.config.loading import load_config  # noqa: E402
from audiencesync.refresh.sources import Sources  # noqa: E402
from audiencesync.store import store as store_mod  # noqa: E402
from audiencesync.store.schema import audiences  # noqa: E402
from audiencesync.sync.cycle import Syncer  # noqa: E402
from examples.make_demo_source import build  # noqa: E402
from tests.gleap_standin import GleapStandIn  # noqa: E402

TOKEN = "demo-token"  # noqa: S105 - the stand-in's, not Gleap's
CYCLES = 12


def churn(source: Path, rng: random.Random, day: str) -> None:
    """Some orders go, some come: the audiences gain and lose members between cycles."""
    with sqlite3.connect(source) as conn:
        rowids = [row[0] for row in conn.execute("SELECT rowid FROM orders ORDER BY rowid")]
        gone = rng.sample(rowids, rng.randint(20, 120))  # the script's own seed: the same demo every time
        conn.executemany("DELETE FROM orders WHERE rowid = ?", [(r,) for r in gone])
        users = [f"user-{rng.randint(1, 2000):05d}" for _ in range(rng.randint(30, 110))]
        conn.executemany(
            "INSERT INTO orders VALUES (?, ?, ?)", [(u, day, round(rng.uniform(50, 600), 2)) for u in users]
        )
    conn.close()


def make_store(directory: Path, gleap: GleapStandIn) -> Path:
    source = directory / "demo_source.db"
    build(source)
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace('base_url = "https://api.gleap.io"', f'base_url = "{gleap.base_url}"')
    text = text.replace("requests_per_minute = 1000", "requests_per_minute = 600000")
    text = text.replace("max_attempts = 5", "max_attempts = 1")
    config_path = directory / "config.toml"
    config_path.write_text(text)
    os.environ["GLEAP_API_TOKEN"] = TOKEN
    config = load_config(config_path)
    engine = store_mod.create_engine(config.store.url, create=True)
    store_mod.upgrade(engine)
    rng = random.Random(7)
    now = store_mod.utc_now().replace(microsecond=0)
    start = now - timedelta(hours=2 * CYCLES)
    for k in range(CYCLES):
        at = start + timedelta(hours=2 * k, minutes=rng.randint(0, 50))
        if k:
            churn(source, rng, at.date().isoformat())
        syncer = Syncer(
            config, store_mod.Store(engine, clock=lambda at=at: at), sources=Sources(config.sources)
        )
        try:
            syncer.run_cycle()
        finally:
            syncer.sources.dispose()
    engine.dispose()
    return config_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon(config_path: Path, port: int) -> subprocess.Popen[bytes]:
    """`audiencesync run` on the demo store, serving its pages on loopback; returns once it is active."""
    with config_path.open("a") as config:
        config.write(f'\n[server]\nlisten = "127.0.0.1:{port}"\n')
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, the config we wrote
        [sys.executable, "-m", "audiencesync", "--config", str(config_path), "run"],
        stderr=subprocess.DEVNULL, env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        wait_for(port, lambda page: "badge active" in page and "no run is delivering" in page, "the daemon")
    except SystemExit:
        process.kill()
        raise
    return process


def wait_for(port: int, ready: Callable[[str], bool], what: str, seconds: float = 120) -> None:
    """Poll the overview until ``ready`` says it shows what is awaited (a deadline, not a sleep)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ready(httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what}: not shown on the overview within {seconds:g} s")


def banner(state: str) -> Callable[[str], bool]:
    return lambda page: f'data-state="{state}" data-subject=' in page


def calm(page: str) -> bool:
    return 'class="banners"' not in page and "no run is delivering" in page


def sync(config_path: Path, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
    """`audiencesync sync --full`: the running daemon carries it out."""
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, the config we wrote
        [sys.executable, "-m", "audiencesync", "--config", str(config_path), "sync", "--full",
         "--wait", "600", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )  # fmt: skip
    if wait:
        process.wait(timeout=600)
    return process


class Camera:
    def __init__(self, base: str, out: Path) -> None:
        # Here, not at the top: --store-only needs neither selenium nor a browser.
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1400,760",
        ):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.base, self.out = base, out

    def shoot(self, path: str, name: str, height: int = 900) -> None:
        self.driver.set_window_size(1400, height)
        self.driver.get(self.base + path)
        self.driver.save_screenshot(str(self.out / name))

    def close(self) -> None:
        self.driver.quit()


AUDIENCE = "/audiences/order_completed_last_30_days"


def states(config_path: Path, gleap: GleapStandIn, port: int, camera: Camera) -> None:
    """Each state in turn, on the daemon's pages: brought about, photographed, then ended."""
    source = config_path.parent / "demo_source.db"
    rng = random.Random(11)
    today = store_mod.utc_now().date().isoformat()
    camera.shoot("/", "web-state-ok.png")

    gleap.hold(after=40)  # some calls answered, the rest wait: a delivery in progress
    churn(source, rng, today)
    running = sync(config_path, wait=False)
    wait_for(port, lambda page: '<tr class="delivery"' in page, "a delivery")
    camera.shoot("/", "web-state-delivering.png")
    gleap.release()
    running.wait(timeout=600)
    wait_for(port, calm, "the delivery's end")

    gleap.fail_user("user-00042", 422, body='{"error":"contact is blocked"}')
    with sqlite3.connect(source) as conn:
        conn.execute("INSERT INTO orders VALUES ('user-00042', ?, 512.5)", (today,))
    conn.close()
    sync(config_path)
    wait_for(port, lambda page: banner("parked")(page) and "no run is delivering" in page, "parked")
    camera.shoot("/", "web-state-parked.png")
    camera.shoot("/", "web-overview.png", 760)
    camera.shoot(AUDIENCE, "web-audience.png", 1250)
    gleap.clear_faults()
    retry = [sys.executable, "-m", "audiencesync", "--config", str(config_path), "retry", "--all"]
    subprocess.run(retry, check=True, capture_output=True, env=os.environ | {"GLEAP_API_TOKEN": TOKEN})  # noqa: S603
    wait_for(port, calm, "the parked change's retry")

    with sqlite3.connect(source) as conn:  # a broken load empties the table: held, not applied
        conn.execute("CREATE TABLE orders_kept AS SELECT * FROM orders")
        conn.execute("DELETE FROM orders")
    conn.close()
    sync(config_path)
    wait_for(port, banner("held"), "held")
    camera.shoot(AUDIENCE, "web-state-held.png")
    with sqlite3.connect(source) as conn:
        conn.execute("INSERT INTO orders SELECT * FROM orders_kept")
        conn.execute("DROP TABLE orders_kept")
    conn.close()
    sync(config_path)
    wait_for(port, calm, "the held audience's recovery")

    gleap.set_token("a-token-rotated-in-gleap")
    churn(source, rng, today)
    sync(config_path)
    wait_for(port, banner("token_refused"), "the refused token")
    camera.shoot("/", "web-state-token_refused.png")
    gleap.set_token(TOKEN)
    sync(config_path)  # the daemon retries a refused token every 5 min; a sync wakes it now
    wait_for(port, calm, "the token's recovery", 900)

    gleap.fail_next(1_000_000, 503)
    churn(source, rng, today)
    sync(config_path, wait=False)
    wait_for(port, banner("gleap_down"), "Gleap down")
    camera.shoot("/", "web-state-gleap_down.png")
    gleap.clear_faults()
    wait_for(port, calm, "Gleap's recovery", 900)


def overdue(config_path: Path, port: int, camera: Camera) -> None:
    """The daemon stopped; its next runs came and went: `audiencesync serve` shows them overdue."""
    config = load_config(config_path)
    engine = store_mod.create_engine(config.store.url)
    with engine.begin() as conn:  # the next runs it planned, an hour past: time moved on
        conn.execute(
            sa.update(audiences).values(next_run_at=store_mod.utc_now() - timedelta(hours=1))
            .where(audiences.c.next_run_at.is_not(None))
        )  # fmt: skip
    engine.dispose()
    serving = subprocess.Popen(  # noqa: S603 - our own interpreter and module, the config we wrote
        [sys.executable, "-m", "audiencesync", "--config", str(config_path), "serve", "--listen",
         f"127.0.0.1:{port}"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(port, banner("overdue"), "overdue")
        camera.shoot("/", "web-state-overdue.png")
    finally:
        serving.terminate()
        serving.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=Path, help="build the demo store here and keep it")
    parser.add_argument(
        "--store-only", action="store_true", help="with --keep: build the demo store, then stop (no browser)"
    )
    args = parser.parse_args()
    if args.store_only and args.keep is None:
        parser.error("--store-only builds the demo store to keep: add --keep DIR")
    with tempfile.TemporaryDirectory() as scratch, GleapStandIn(TOKEN) as gleap:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        config_path = make_store(directory, gleap)
        if args.store_only:
            print(f"the demo store is in {directory}; to see its pages, run:")
            print(f"  .venv/bin/audiencesync --config {config_path} serve    # http://127.0.0.1:9464/")
            return
        port = free_port()
        running = daemon(config_path, port)
        camera = Camera(f"http://127.0.0.1:{port}", ROOT / "docs")
        try:
            try:
                states(config_path, gleap, port, camera)
            finally:
                running.terminate()
                running.wait(timeout=60)
            overdue(config_path, port, camera)
        finally:
            camera.close()
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("web-*.png"))))


if __name__ == "__main__":
    main()
