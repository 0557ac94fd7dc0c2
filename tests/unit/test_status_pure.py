"""The status page's pure parts: [status] validation, the failure sentence, the chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from glio_node.config import ConfigError, StatusSettings, load_settings
from glio_node.store.models import Job, JobState
from glio_node.web.chart import throughput_svg
from glio_node.web.snapshot import plain_reason

TOKEN = "a-long-random-token-0123456789"


def test_start_up_refuses_an_empty_or_example_token_beyond_localhost():
    with pytest.raises(ConfigError, match=r"host = '0.0.0.0' listens beyond this machine but token is empty"):
        StatusSettings(host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"token is an example value"):
        StatusSettings(host="0.0.0.0", token="change-me")
    with pytest.raises(ConfigError, match=r"shorter than 16 characters"):
        StatusSettings(token="short")
    assert StatusSettings(host="127.0.0.1").is_loopback and StatusSettings(host="::1").is_loopback
    assert not StatusSettings(host="pacs-gw.example.org", token=TOKEN).is_loopback


def test_the_token_comes_from_the_environment_and_is_checked_there_too():
    s = load_settings(None, {"GLIO_STATUS_HOST": "0.0.0.0", "GLIO_STATUS_TOKEN": TOKEN})
    assert s.status.token == TOKEN
    with pytest.raises(ConfigError, match=r"token is empty"):
        load_settings(None, {"GLIO_STATUS_HOST": "0.0.0.0"})


def _job(state: JobState, error: str, attempts: int = 1, max_attempts: int = 3) -> Job:
    return Job(state=state, last_error=error, attempts=attempts, max_attempts=max_attempts)


def test_a_failure_reads_as_a_sentence_without_spool_paths():
    bad = _job(JobState.FAILED, "/var/spool/instances/1.2.3/4.5.6/7.8.9.dcm: no PixelSpacing; the scanner must record it")
    assert plain_reason(bad) == "The slide could not be analysed: 7.8.9.dcm: no PixelSpacing; the scanner must record it"
    exhausted = _job(JobState.FAILED, "RuntimeError: out of memory", attempts=3)
    assert plain_reason(exhausted) == "Gave up after 3 attempts; the last one failed with: RuntimeError: out of memory"
    retrying = _job(JobState.WAITING, "RuntimeError: out of memory", attempts=1)
    assert plain_reason(retrying).startswith("Attempt 1 of 3 failed and will be retried")
    assert plain_reason(_job(JobState.DONE, "")) is None


def test_the_chart_has_a_bar_per_hour_with_work_and_says_what_it_shows():
    start = datetime(2026, 11, 23, tzinfo=UTC)
    hours = [(start + timedelta(hours=i), i % 3, 1 if i == 5 else 0) for i in range(24)]
    svg = throughput_svg(hours)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="done"') == sum(1 for _, d, _ in hours if d)
    assert svg.count('class="failed"') == 1 and "05:00 UTC: 2 done, 1 failed" in svg
    assert "peak 3" in svg
    assert "<rect" not in throughput_svg([(start, 0, 0)] * 24)
