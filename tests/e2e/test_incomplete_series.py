"""A quiet but incomplete series, end to end through the real SCP (DCMTK storescu ->
``glio-node serve``): it is not a job after ``quiet_seconds``; it becomes one, with the warning
in the job's audit trail, after ``incomplete_wait_seconds`` more.

The slide's base level is split into concatenations and one part is never sent: the series'
own headers say it is incomplete (``InConcatenationTotalNumber``).  Once run, the missing
frames read as glass and the SR says the source was incomplete (tests/integration/
test_incomplete_slide.py checks the outputs).  A level left out entirely
cannot be noticed (nothing says how many levels a pyramid has; see pipeline/series.py).
"""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
from node_process import wait_for

from glio_node.store.models import JobState
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("storescu"),
]

# Base level 4x3 tiles in 3 parts of 4 frames; the second level fits in one instance.
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=2, frames_per_file=4,
                 context_images=False)
QUIET, WAIT = 1.0, 6.0


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("incomplete-slide"))


def test_a_quiet_incomplete_series_waits_then_runs_with_the_warning_recorded(
    make_node, slide, monkeypatch
):
    missing = next(f for f in slide.files if f.name == "level0-part002.dcm")
    sent = [f for f in slide.files if f != missing]
    monkeypatch.setenv("GLIO_SERIES_QUIET_SECONDS", str(QUIET))
    monkeypatch.setenv("GLIO_SERIES_INCOMPLETE_WAIT_SECONDS", str(WAIT))
    node = make_node(None).start()
    done = subprocess.run(
        ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(node.port), *map(str, sent)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr

    # Quiet: judged incomplete, told to wait, and no job.
    [waiting] = wait_for(lambda: node.events("series_incomplete"), 15, "the series to be judged", node)
    assert "concatenation of 3 instances arrived with only 2" in waiting.details["gaps"][0]
    assert "waiting_until" in waiting.details and waiting.job_id is None
    assert node.jobs() == []
    assert "quiet but incomplete, waiting" in node.log()

    # After incomplete_wait_seconds: a job, with the warning in its own trail.
    [job] = wait_for(node.jobs, WAIT + 15, "the job of the incomplete series", node)
    [_, queued] = node.events("series_incomplete")
    assert queued.job_id == job.id
    assert queued.details["warning"].startswith("quiet and still incomplete")
    assert queued.details["gaps"] == waiting.details["gaps"]
    received = max(e.at for e in node.events("instance_received"))
    assert job.created_at - received >= timedelta(seconds=QUIET + WAIT)
    assert f"queued incomplete as job {job.id}" in node.log()

    # Analysed as it arrived: the missing frames read as glass, the warning in the job's trail.
    wait_for(lambda: node.jobs()[0].state == JobState.DONE, 60, "the job to finish", node)
    [job] = node.jobs()
    assert job.attempts == 1
    [finished] = node.events("job_finished")
    assert any("arrived incomplete" in note for note in finished.details["notes"])
    assert node.stop() == 0
    assert slide.series_instance_uid not in node.log()
