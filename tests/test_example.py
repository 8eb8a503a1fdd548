"""The README's first command: the demo source and config.example.toml give a sensible dry run."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_dry_run_plans_memberships_with_contact_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLEAP_API_TOKEN", raising=False)
    shutil.copy(ROOT / "config.example.toml", tmp_path)
    made = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_demo_source.py"), str(tmp_path / "demo_source.db")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "orders and their users" in made.stdout
    config = str(tmp_path / "config.example.toml")
    run = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", config, "sync", "--dry-run", "--format", "csv"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    by_call: dict[str, dict[str, str]] = {}
    for row in rows:
        by_call.setdefault(row["call"], {"user_id": row["user_id"]})[row["audience"]] = row["value"]
    high_value = [body for body in by_call.values() if body.get("high_value_users") == "true"]
    assert high_value, "no member of the audience with contact fields"
    for body in high_value:
        # The fields go with the membership, in Gleap's names and formats.
        assert {"name", "email", "plan", "lang", "createdAt", "seats"} <= set(body)
        assert body["createdAt"].endswith(".000Z") and "@example.com" in body["email"]
        assert "first_name" not in body and "created_at" not in body
    # The other audience's members get their boolean alone.
    assert any(set(body) == {"user_id", "order_completed_last_30_days"} for body in by_call.values())
    assert "high_value_users" in run.stderr and "nothing was sent or stored" in run.stderr
    assert not (tmp_path / "audiencesync.db").exists()  # a dry run creates no store
