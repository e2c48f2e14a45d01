"""The strict-skip policy of CI (skip_policy.py) and the one definition of where chromium is (helpers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ALLOWED_SKIPS, CHROMIUM_MISSING, chromium_path, skip_allowed

SKIPPING = '''
import pytest

pytest.importorskip("surely_not_installed_module")
'''
MIXED = '''
import pytest

def test_missing_dependency():
    pytest.skip("gguf is not installed: pip install -e '.[test]'")

@pytest.mark.skipif(True, reason="no CUDA GPU on this machine")
def test_gpu():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_known_bug():
    assert False

def test_passes():
    pass
'''


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: str | None) -> pytest.RunResult:
    if strict is None:
        monkeypatch.delenv("OPTIMER_STRICT_SKIPS", raising=False)
    else:
        monkeypatch.setenv("OPTIMER_STRICT_SKIPS", strict)
    return pytester.runpytest_inprocess("-p", "skip_policy", "-rfEs", "-p", "no:cacheprovider")


def test_without_strict_mode_skips_stay_skips(pytester, monkeypatch):
    pytester.makepyfile(test_mixed=MIXED, test_module_skip=SKIPPING)
    for value in (None, "0", ""):
        res = _run(pytester, monkeypatch, value)
        res.assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_strict_mode_fails_every_skip_but_missing_hardware(pytester, monkeypatch):
    pytester.makepyfile(test_mixed=MIXED)
    res = _run(pytester, monkeypatch, "1")
    res.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    out = res.stdout.str()
    assert "FAILED test_mixed.py::test_missing_dependency" in out and "gguf is not installed" in out
    assert "skipped under OPTIMER_STRICT_SKIPS=1" in out
    assert "SKIPPED [1] test_mixed.py" in out and "no CUDA GPU on this machine" in out  # listed by -rs
    assert res.ret == pytest.ExitCode.TESTS_FAILED


def test_strict_mode_turns_a_module_level_skip_into_a_collection_error(pytester, monkeypatch):
    pytester.makepyfile(test_module_skip=SKIPPING)
    res = _run(pytester, monkeypatch, "1")
    res.assert_outcomes(errors=1)
    assert "ERROR test_module_skip.py" in res.stdout.str() and "surely_not_installed_module" in res.stdout.str()
    assert res.ret == pytest.ExitCode.INTERRUPTED


def test_allowed_reasons():
    assert ALLOWED_SKIPS == ("no CUDA GPU",)
    assert skip_allowed("no CUDA GPU: the CPU/GPU parity checks need one")
    assert not skip_allowed(CHROMIUM_MISSING)
    assert not skip_allowed("could not import 'lm_eval': No module named 'lm_eval'")


def test_chromium_has_one_definition(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OPTIMER_CHROMIUM", str(fake))
    assert chromium_path() == fake
    helpers = Path(__file__).with_name("helpers.py")
    r = subprocess.run([sys.executable, str(helpers), "chromium"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(fake)  # what .ci/run reads
    monkeypatch.setenv("OPTIMER_CHROMIUM", str(tmp_path / "absent"))
    assert chromium_path() is None
    r = subprocess.run([sys.executable, str(helpers), "chromium"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "apt-get install chromium" in r.stderr


def test_timeouts(pytester, request):
    """pytest-timeout is active with the project's limit; slow tests get conftest's longer one."""
    from conftest import SLOW_TIMEOUT_S

    assert request.config.getini("timeout") == "300" and "-rfEs" in request.config.getini("addopts")
    assert request.node.get_closest_marker("timeout") is None  # a default test: the ini limit
    project_conftest = Path(__file__).with_name("conftest.py")
    pytester.makeconftest(f"""
import importlib.util
import sys
spec = importlib.util.spec_from_file_location("project_conftest", {str(project_conftest)!r})
project = sys.modules["project_conftest"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
pytest_collection_modifyitems = project.pytest_collection_modifyitems
""")
    pytester.makeini("[pytest]\nmarkers = slow\ntimeout = 1\n")
    pytester.makepyfile(test_t=f"""
import time
import pytest

@pytest.mark.slow
def test_slow_gets_the_long_limit(request):
    assert request.node.get_closest_marker("timeout").args == ({SLOW_TIMEOUT_S},)

@pytest.mark.slow
@pytest.mark.timeout(7)
def test_own_limit_kept(request):
    assert request.node.get_closest_marker("timeout").args == (7,)

def test_hangs():
    time.sleep(30)
""")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rfE", timeout=300)
    res.assert_outcomes(passed=2, failed=1)
    assert "Timeout" in res.stdout.str() and "test_hangs" in res.stdout.str()


def test_require_imports_or_skips_saying_how_to_install():
    import json

    from helpers import require

    assert require("json") is json
    with pytest.raises(pytest.skip.Exception, match=r"surely_not_installed_module is not installed .*pip install"):
        require("surely_not_installed_module")
