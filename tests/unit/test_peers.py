"""A CI run cannot go green by skipping: a missing peer fails the test when ``CI`` is set.

The rule (tests/peers.py) is run as CI runs it: pytest in a subprocess, over a test that needs a
tool no machine has, once through :func:`peers.require` and once through the ``needs`` marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
MISSING = "glio-no-such-tool"

NEEDS_A_MISSING_TOOL = f'''
import pytest
from peers import require

def test_calls_require():
    require("{MISSING}", "to prove the rule")

@pytest.fixture
def a_peer_session():
    raise AssertionError("the fixtures of a test whose peer is missing must not be set up")

@pytest.mark.needs("{MISSING}")
def test_marked(a_peer_session):
    raise AssertionError("the body of a test whose peer is missing must not run")

def test_with_what_is_there():
    assert require("sh").endswith("/sh")
'''


def outcomes(tmp_path: Path, ci: str | None) -> dict[str, tuple[str, str]]:
    """Run the tests above with ``CI`` set to ``ci`` (None: unset): name -> (outcome, message)."""
    (tmp_path / "test_needs.py").write_text(NEEDS_A_MISSING_TOOL)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)}
    if ci is not None:
        env["CI"] = ci
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "peers", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}", "test_needs.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    found = {}
    for case in ET.parse(report).iter("testcase"):
        verdict = next(iter(case), None)
        found[case.get("name")] = (
            ("passed", "") if verdict is None else (verdict.tag, verdict.get("message", ""))
        )
    return found


def test_under_ci_a_missing_peer_fails_the_test_whether_required_or_marked(tmp_path):
    result = outcomes(tmp_path, "true")
    assert result["test_with_what_is_there"] == ("passed", "")
    outcome, message = result["test_calls_require"]
    assert outcome == "failure"
    assert f"{MISSING} is not installed (a command on PATH): to prove the rule" in message
    assert "CI is set: a missing peer is a failure, not a skip" in message
    outcome, message = result["test_marked"]
    assert outcome == "error"  # stopped in setup, before its fixtures and its body
    assert f"{MISSING} is not installed" in message and "must not" not in message


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_missing_peer_skips_with_what_to_install(tmp_path, ci):
    result = outcomes(tmp_path, ci)
    assert result["test_with_what_is_there"] == ("passed", "")
    for name in ("test_calls_require", "test_marked"):
        outcome, message = result[name]
        assert outcome == "skipped", (name, outcome, message)
        assert f"{MISSING} is not installed" in message and "CI is set" not in message
