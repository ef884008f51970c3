"""The suite's own guards: the hang guard is on, and a skip for an unlisted reason fails."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def test_the_hang_guard_is_active(pytestconfig: pytest.Config) -> None:
    """pytest-timeout is loaded and every test has a finite timeout (a missing plugin would silently
    leave Ray tests free to hang CI)."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 900


def test_a_skip_for_an_unlisted_reason_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        """
        import pytest

        def test_quietly_skipped():
            pytest.skip("the service did not start")

        def test_allowed():
            pytest.skip("no Docker Compose v2 client here")

        @pytest.mark.skipif(True, reason="reads /proc")
        def test_allowed_mark():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1, skipped=2)
    result.stdout.fnmatch_lines(["*not in tests/conftest.py ALLOWED_SKIPS: the service did not start*"])
