#!/usr/bin/env python3
"""The SQLite run's survivors again, on PostgreSQL: for the branches only PostgreSQL takes.

    AUDIENCESYNC_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mut_test \\
        python scripts/mutate_postgres.py 'audiencesync.store.outcomes.x__acknowledge__*'

`scripts/mutate` runs on SQLite, so it needs no server; a mutant in a branch only PostgreSQL
takes (``outcomes._acknowledge``'s arrays) survives it unseen. This runs each survivor whose
name matches a pattern once more in mutants/, with the mutant active, against the PostgreSQL
cases of exactly the tests mutmut found reaching its function (``test_x[sqlite]`` becomes
``test_x[postgresql]``), stopping at the first failure. The same tests are run first with no
mutant: they must pass, else a failure would say nothing about the mutant. The verdicts go to
mutants/postgres-verdicts.json, which `scripts/mutation_score.py` reads: a survivor of the
SQLite run that the PostgreSQL tests kill is killed. The database is wiped, as for the suite.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
VERDICTS = MUTANTS / "postgres-verdicts.json"
SURVIVED = 0  # mutmut's exit code for a mutant the tests let pass
CODES = {0: "survived", 1: "killed", 5: "no tests"}  # pytest's exit codes


def survivors() -> list[str]:
    names = []
    # rglob: the modules live in subpackages (delivery/, gleap/, store/) since the move by concept.
    for meta in sorted((MUTANTS / "audiencesync").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        names += [name for name, code in codes.items() if code == SURVIVED]
    return names


def postgres_tests(name: str) -> list[str]:
    """The PostgreSQL cases of the tests that reach the mutant's function (SQLite cases seen by mutmut)."""
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    function = name.rsplit("__mutmut_", 1)[0]
    tests = set()
    for test in stats.get(function, []):
        case = re.sub(r"\[sqlite(?=[\]-])", "[postgresql", test, count=1)
        if case != test:  # a test that doesn't vary by store has no PostgreSQL case
            tests.add(case)
    # A test parametrized on SQLite alone (a SQLite lock's case) has no PostgreSQL case to run.
    return sorted(tests & collected(sorted({t.split("::", 1)[0] for t in tests})))


_collected: dict[tuple[str, ...], set[str]] = {}


def collected(files: list[str]) -> set[str]:
    """The test ids pytest collects from ``files`` in mutants/ (cached per set of files)."""
    key = tuple(files)
    if key not in _collected:
        done = subprocess.run(  # noqa: S603 (our own interpreter and test files)
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
            cwd=MUTANTS,
            env=os.environ | {"PYTHONPATH": str(MUTANTS)},
            capture_output=True,
            text=True,
            check=False,
        )
        _collected[key] = {line for line in done.stdout.splitlines() if "::" in line}
    return _collected[key]


def pytest(tests: list[str], mutant: str, timeout: float) -> int | None:
    # mutants/ first on the path: its package is the one with the mutants in it.
    env = os.environ | {"MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(MUTANTS)}
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and test ids)
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=MUTANTS,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="mutant names or shell patterns (fnmatch)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a mutant's tests may take")
    args = parser.parse_args()
    if not os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"):
        sys.exit("scripts/mutate_postgres.py: set AUDIENCESYNC_TEST_POSTGRES_URL to a scratch database")
    if not (MUTANTS / "mutmut-stats.json").is_file():
        sys.exit("scripts/mutate_postgres.py: no mutants/ yet; run scripts/mutate first")
    chosen = [n for n in survivors() if any(fnmatch.fnmatchcase(n, p) for p in args.patterns)]
    if not chosen:
        sys.exit("scripts/mutate_postgres.py: no survivor of the SQLite run matches")
    verdicts: dict[str, str] = json.loads(VERDICTS.read_text()) if VERDICTS.is_file() else {}
    clean: set[tuple[str, ...]] = set()  # test sets seen passing with no mutant
    for name in chosen:
        tests = postgres_tests(name)
        if not tests:
            verdicts[name] = "no tests"
        else:
            if tuple(tests) not in clean:
                if pytest(tests, "", args.timeout) != 0:
                    sys.exit(f"scripts/mutate_postgres.py: the tests reaching {name} fail with no mutant")
                clean.add(tuple(tests))
            code = pytest(tests, name, args.timeout)
            verdicts[name] = "timeout" if code is None else CODES.get(code, f"error (pytest exit {code})")
        print(f"{verdicts[name]:>8}  {name}  ({len(tests)} PostgreSQL tests)", flush=True)
        VERDICTS.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
