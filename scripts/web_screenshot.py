"""Regenerate docs/web-overview.png and docs/web-audience.png: the status page on the demo data.

    python scripts/web_screenshot.py [--keep DIR]

It builds the demo source (examples/make_demo_source.py) and a store in a scratch directory,
syncs config.example.toml's audiences against the loopback Gleap stand-in of the tests
(tests/gleap_standin.py: no real Gleap, no token) for a day of cycles two hours apart, with
orders coming and going between them (and one user Gleap refuses, so a failure is parked), then
starts the daemon (`audiencesync run`, which catches up at once) and photographs the pages it
serves in headless Chromium (/usr/bin/chromium, chromedriver).
With --keep DIR the demo store stays there, for `audiencesync --config DIR/config.toml serve`.
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
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

from audiencesync import store as store_mod  # noqa: E402
from audiencesync.config import load_config  # noqa: E402
from audiencesync.sources import Sources  # noqa: E402
from audiencesync.sync import Syncer  # noqa: E402
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
    gleap.fail_user("user-00042", 422, body='{"error":"contact is blocked"}')
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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
            if "badge active" in page and "no run is delivering" in page:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the daemon did not become active within 60 s")


def photograph(base: str, out: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(base + "/")
        driver.save_screenshot(str(out / "web-overview.png"))
        driver.set_window_size(1400, 1250)
        driver.get(base + "/audiences/order_completed_last_30_days")
        driver.save_screenshot(str(out / "web-audience.png"))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=Path, help="build the demo store here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, GleapStandIn(TOKEN) as gleap:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        config_path = make_store(directory, gleap)
        port = free_port()
        running = daemon(config_path, port)
        try:
            photograph(f"http://127.0.0.1:{port}", ROOT / "docs")
        finally:
            running.terminate()
            running.wait(timeout=60)
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("web-*.png"))))


if __name__ == "__main__":
    main()
