from __future__ import annotations

import pytest

from audiencesync.keys import key_for_name, key_problem


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("HighValueUsers", "high_value_users"),
        ("Churn-Risk (EU)", "churn_risk_eu"),
        ("Café Lovers", "cafe_lovers"),
        ("30 Day Actives", "30_day_actives"),
        ("Order Completed Last 30 Days", "order_completed_last_30_days"),
        ("order_completed_last_30days", "order_completed_last_30days"),
        ("  Spaces   and__underscores  ", "spaces_and_underscores"),
        ("!!!", ""),
    ],
)
def test_key_for_name(name: str, key: str) -> None:
    assert key_for_name(name) == key


@pytest.mark.parametrize("key", ["a", "high_value_users", "30_day_actives", "x1_y2"])
def test_valid_keys(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("High", "lowercase"),
        ("a__b", "single underscores"),
        ("_a", "start or end"),
        ("a_", "start or end"),
        ("a-b", "lowercase letters"),
        ("email", "contact field 'email'"),
        ("name", "contact field 'name'"),
        ("company_name", "contact field 'companyName'"),
        ("last_page_view", "contact field 'lastPageView'"),
        ("userid", "contact field 'userId'"),
    ],
)
def test_invalid_keys(key: str, why: str) -> None:
    problem = key_problem(key)
    assert problem is not None and why in problem
