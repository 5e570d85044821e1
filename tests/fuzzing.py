"""Fuzzing bookkeeping (issue #8): one hypothesis profile, how many cases each target got, and
the property every rejection shares (:func:`assert_readable`).

Every fuzz test runs under :func:`fuzz_settings` and calls :func:`case` once per generated
input with the name of what it fuzzes. ``conftest.py`` prints :func:`summary_line` at the
end of a run, so CI output shows the totals (at least :data:`MINIMUM_CASES` per run, zero
failures). Failing examples are kept in ``.hypothesis/`` and tried first on the next run.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings

PROFILE = "supportlens-fuzz"
MINIMUM_CASES = 10_000
MODULE_PREFIX = "test_fuzz_"  # the files whose tests are fuzz tests, for counting failures

settings.register_profile(
    PROFILE,
    # generous: on a loaded 2-core CI machine one case may take a while; a hang still fails
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

CASES: Counter[str] = Counter()

# Python's words reaching a person mean a decoder let an exception's own text through.
PYTHON_WORDS = ("Traceback", "NoneType", "object has no attribute", "unhashable type", "invalid literal for int()",
                "set_int_max_str_digits", "is not subscriptable", "object is not iterable", "<class '")


def fuzz_settings(max_examples: int, **overrides: object) -> settings:
    """The fuzz profile with this test's share of the run's cases.

    Loaded per test, not globally, so other hypothesis tests keep their own settings.
    """
    return settings(settings.get_profile(PROFILE), max_examples=max_examples, **overrides)


def case(target: str) -> None:
    """Count one generated input for ``target`` (a decoder or an endpoint)."""
    CASES[target] += 1


def is_fuzz_test(path: str | Path) -> bool:
    return Path(str(path).partition("::")[0]).name.startswith(MODULE_PREFIX)


def summary_line(failures: int) -> str:
    """The totals CI prints; a run of only some fuzz tests says it fell short of the issue's minimum."""
    total = sum(CASES.values())
    line = f"fuzz: {total:,} generated cases over {len(CASES)} targets, {failures} failures"
    return line if total >= MINIMUM_CASES else f"{line} (fewer than the {MINIMUM_CASES:,} a full run makes)"


def assert_readable(reason: str) -> None:
    """A reason a person can act on: not empty, not Python's own words."""
    assert isinstance(reason, str) and reason.strip(), f"empty reason: {reason!r}"
    for words in PYTHON_WORDS:
        assert words not in reason, reason
