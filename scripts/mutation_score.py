#!/usr/bin/env python3
"""The mutation score of the delivery core, from mutmut's results in mutants/ (see scripts/mutate).

    python scripts/mutation_score.py                       # the table: each module, and all
    python scripts/mutation_score.py --sample 400 --seed 7  # print a uniform sample of mutant names

A full run of every mutant takes most of a day on a shared 2-core machine, so `scripts/mutate`
can run a seeded uniform sample of them (MUTATE_SAMPLE): the score of a uniform sample
estimates the whole's, and the table gives its 95% interval (Wilson's) beside it. A mutant
that no selected test reaches ("no tests") counts as a survivor: nothing would notice it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# mutmut's own words for its exit codes. Interrupted or not checked: not run yet. A timeout is
# not scored: a mutant that makes a wait endless is noticed, but on a loaded machine a survivor
# can run out of time too (seen here), so timeouts are listed apart, to run again when quiet.
NOT_RUN = {"not checked", "check was interrupted by user"}


KILLED = 1  # mutmut's exit code for a mutant a test failed on


def results() -> dict[str, dict[str, int | None]]:
    """Module path -> {mutant name: exit code, or None when not run yet}. A survivor of the
    SQLite run that scripts/mutate_postgres.py saw killed on PostgreSQL counts as killed."""
    verdicts_file = ROOT / "mutants" / "postgres-verdicts.json"
    verdicts = json.loads(verdicts_file.read_text()) if verdicts_file.is_file() else {}
    out = {}
    package = ROOT / "mutants" / "audiencesync"
    # rglob: the modules live in subpackages (delivery/, gleap/, store/) since the move by concept.
    for meta in sorted(package.rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        out[meta.relative_to(package).as_posix().removesuffix(".meta")] = {
            name: KILLED if code == 0 and verdicts.get(name) == "killed" else code
            for name, code in codes.items()
        }
    if not out:
        sys.exit("scripts/mutation_score.py: no mutants/ yet; run scripts/mutate first")
    return out


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def classify(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    status = status_by_exit_code[code]
    if status in NOT_RUN:
        return "not run"
    if status in ("killed", "survived", "no tests", "timeout"):
        return status
    return "other"  # suspicious, skipped, segfault: listed by mutmut, not scored


def table(only: set[str] | None) -> None:
    rows, total = [], Counter[str]()
    for module, codes in results().items():
        count = Counter(classify(code) for name, code in codes.items() if only is None or name in only)
        if not sum(count.values()):
            continue
        rows.append((module, sum(count.values()), count))
        total.update(count)
    header = (
        "| module | mutants | decided | killed | survived | no tests | timeout (not scored) "
        "| score of those decided | 95% interval |"
    )
    print(header)
    print("| --- " * 9 + "|")
    for module, mutants, count in [*rows, ("all", sum(r[1] for r in rows), total)]:
        run = count["killed"] + count["survived"] + count["no tests"]  # decided: a timeout is not
        low, high = wilson(count["killed"], run)
        score = f"{count['killed'] / run:.1%}" if run else "-"
        print(
            f"| `{module}` | {mutants} | {run} | {count['killed']} | {count['survived']} | "
            f"{count['no tests']} | {count['timeout']} | {score} | {low:.1%}-{high:.1%} |"
        )
    if total["other"]:
        print(f"({total['other']} mutants neither killed nor survived: see `python -m mutmut results`)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="print this many mutant names, drawn uniformly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=Path, help="score only the names listed in this file (a sample)")
    args = parser.parse_args()
    if args.sample is not None:
        names = sorted(name for codes in results().values() for name in codes)
        for name in sorted(random.Random(args.seed).sample(names, min(args.sample, len(names)))):
            print(name)
        return 0
    table(set(args.only.read_text().split()) if args.only else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
