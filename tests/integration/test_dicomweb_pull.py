"""The DICOMweb pull mode's parts against real servers: Orthanc's DICOMweb plugin and a tiny
local HTTP server for only what Orthanc cannot do (bearer tokens, a body cut short, HTTP 503).

The story: a site's PACS speaks only DICOMweb.  The node reads Orthanc's WADO-RS answer part by
part into files that are byte-identical to what the scanner stored; it authenticates with basic
auth or a bearer token; wrong credentials give the operator one clear message naming the source,
not a crash and not a log line per poll; at its first poll it takes only the recent studies of
an archive; a series still being uploaded waits until it holds still, and is taken once; a
server that goes down, or cuts a series short, leaves the series to be taken at the next poll,
never half-recorded.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from orthanc_peer import Orthanc, free_port
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from glio_node.config import Destination, Source
from glio_node.pull.dicomweb import WADO_ACCEPT, DicomwebSource, SourceRefused
from glio_node.pull.multipart import MultipartError, boundary_of, split_parts
from glio_node.pull.poller import SourcePoller
from glio_node.receive.spool import Spool
from glio_node.send.dicomweb import StowSender
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.actions import set_intake_paused
from glio_node.store.models import (
    AuditEvent,
    Instance,
    PullSeries,
    PullSource,
    PullState,
    Series,
)
from glio_node.synthetic.slide import (
    ACCESSION_NUMBER,
    SlideSpec,
    SyntheticSlide,
    write_synthetic_slide,
)

needs_orthanc = pytest.mark.needs("orthanc", "orthanc-dicomweb")

SPEC = SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, context_images=False)
USER, PASSWORD = "glio", "secret"


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("pull-slide"))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, slide: SyntheticSlide) -> Iterator[Orthanc]:
    """Orthanc with basic auth on, holding the slide."""
    peer = Orthanc(
        tmp_path_factory.mktemp("orthanc"), free_port(), free_port(),
        extra={"AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}},
    )
    peer.start()
    try:
        put(peer, *slide.files)
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def open_orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc of the test's own, empty, without authentication."""
    peer = Orthanc(tmp_path / "open-orthanc", free_port(), free_port()).start()
    yield peer
    peer.stop()


def put(orthanc: Orthanc, *files: Path | bytes) -> None:
    """Store files (or DICOM bytes) in Orthanc by its REST API, as a scanner's gateway would."""
    for item in files:
        data = item if isinstance(item, bytes) else item.read_bytes()
        request = urllib.request.Request(
            orthanc.url + "/instances", data=data, method="POST", headers=orthanc.auth_headers()
        )
        urllib.request.urlopen(request, timeout=30).close()


def rewritten(path: Path, **values: str) -> bytes:
    """The DICOM file at ``path`` with ``values`` (keyword: value) changed, as bytes."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessions(engine)
    engine.dispose()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def events(sessions, name: str) -> list[AuditEvent]:
    with sessions.begin() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == name)))


def count(sessions, model) -> int:
    with sessions.begin() as s:
        return s.scalar(select(func.count()).select_from(model))


def pull_state(sessions, name: str) -> PullSource:
    with sessions.begin() as s:
        row = s.scalars(select(PullSource).where(PullSource.name == name)).one()
        s.expunge(row)
        return row


# ------------------------------------------------------------------------------------------
# The multipart reader


def orthanc_wado_body(orthanc: Orthanc, slide: SyntheticSlide) -> tuple[str, bytes]:
    url = f"{orthanc.dicomweb_url}/studies/{slide.study_instance_uid}/series/{slide.series_instance_uid}"
    request = urllib.request.Request(url, headers={"Accept": WADO_ACCEPT, **basic(USER, PASSWORD)})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.headers["Content-Type"], r.read()


def split_in_memory(body: bytes, boundary: str, chunk_size: int) -> list[bytes]:
    parts: list[io.BytesIO] = []

    def open_part(headers: dict[str, str]) -> io.BytesIO:
        assert headers["content-type"] == "application/dicom"
        parts.append(io.BytesIO())
        return parts[-1]

    n = split_parts(io.BytesIO(body), boundary, open_part, chunk_size=chunk_size)
    assert n == len(parts)
    return [p.getvalue() for p in parts]


@needs_orthanc
@pytest.mark.parametrize("chunk_size", [1 << 20, 4096, 77, 5])
def test_orthanc_s_wado_rs_answer_splits_into_the_files_the_scanner_stored(orthanc, slide, chunk_size):
    content_type, body = orthanc_wado_body(orthanc, slide)
    parts = split_in_memory(body, boundary_of(content_type), chunk_size)
    # Small chunks cut delimiters and headers across reads; the files come out the same.
    assert sorted(map(sha256, parts)) == sorted(sha256(p.read_bytes()) for p in slide.files)


@needs_orthanc
def test_a_malformed_or_truncated_body_is_an_error_not_a_short_series(orthanc, slide):
    content_type, body = orthanc_wado_body(orthanc, slide)
    boundary = boundary_of(content_type)
    closing = body.rindex(b"--" + boundary.encode())
    with pytest.raises(MultipartError, match="truncated"):
        split_in_memory(body[:closing - 100], boundary, 4096)  # cut inside the last part
    with pytest.raises(MultipartError, match="truncated"):
        split_in_memory(body[:100], boundary, 4096)  # cut inside the first part's headers
    with pytest.raises(MultipartError, match="no multipart delimiter"):
        split_in_memory(b"<html>Internal error</html>", boundary, 4096)
    broken_header = body.replace(b"Content-Type: application/dicom", b"Content-Type application/dicom", 1)
    with pytest.raises(MultipartError, match="malformed header"):
        split_in_memory(broken_header, boundary, 4096)
    with pytest.raises(MultipartError, match="not multipart/related"):
        boundary_of("application/dicom+json")
    with pytest.raises(MultipartError, match="no valid boundary"):
        boundary_of('multipart/related; type="application/dicom"')


# ------------------------------------------------------------------------------------------
# Basic auth against Orthanc


T_PAUSE = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def source(url: str, **kw) -> Source:
    return Source("pacs-web", url=url, poll_seconds=1, **kw)


@needs_orthanc
def test_basic_auth_takes_the_slide_into_the_spool_like_a_c_store(orthanc, slide, sessions, tmp_path):
    spool = Spool(tmp_path / "spool")
    poller = SourcePoller(
        source(orthanc.dicomweb_url, auth="basic", username=USER, password=PASSWORD), sessions, spool
    )
    with sessions.begin() as s:  # an operator paused intake: pulling is intake too
        set_intake_paused(s, True, T_PAUSE, by="it-desk", address=None)
    assert poller.poll() == 0
    with sessions.begin() as s:
        assert s.scalars(select(PullSeries)).all() == []  # not even asked
        set_intake_paused(s, False, T_PAUSE, by="it-desk", address=None)
    assert poller.poll() == 0  # first sight: seen, not taken until its count holds still
    with sessions.begin() as s:
        [row] = s.scalars(select(PullSeries))
        assert (row.series_instance_uid, row.state) == (slide.series_instance_uid, PullState.SEEN)
    assert poller.poll() == 1
    with sessions.begin() as s:
        stored = {i.sha256: Path(i.path) for i in s.scalars(select(Instance))}
        assert {i.calling_ae for i in s.scalars(select(Instance))} == {"pacs-web"}
        [series] = s.scalars(select(Series))  # found by the status page's accession search
        assert series.accession_number == ACCESSION_NUMBER
    assert set(stored) == {sha256(p.read_bytes()) for p in slide.files}
    assert all(p.is_file() and p.is_relative_to(spool.instances_dir) for p in stored.values())
    assert list(spool.incoming_dir.iterdir()) == []
    assert poller.poll() == 0  # taken: never again
    assert len(events(sessions, "series_retrieved")) == 1
    assert len(events(sessions, "instance_received")) == len(slide.files)
    assert pull_state(sessions, "pacs-web").last_error is None


@needs_orthanc
def test_a_wrong_password_is_one_clear_message_and_no_crash(orthanc, sessions, tmp_path, caplog):
    poller = SourcePoller(
        source(orthanc.dicomweb_url, auth="basic", username=USER, password="wrong-pass"),
        sessions, Spool(tmp_path / "spool"),
    )
    with caplog.at_level(logging.DEBUG, logger="glio_node.pull"):
        for _ in range(3):
            assert poller.poll() == 0
    [failed] = events(sessions, "poll_failed")
    message = failed.details["error"]
    assert "source pacs-web" in message and "HTTP 401" in message
    assert "check auth, username and password" in message
    assert pull_state(sessions, "pacs-web").last_error == message
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [message]  # once, not at every poll
    assert "wrong-pass" not in caplog.text and "wrong-pass" not in json.dumps(failed.details)
    assert count(sessions, PullSeries) == 0


@needs_orthanc
def test_refusals_name_the_source_and_what_to_check(orthanc, tmp_path):
    wrong_password = source(orthanc.dicomweb_url, auth="basic", username=USER, password="nope")
    with pytest.raises(SourceRefused, match=r"source pacs-web .* HTTP 401: the server refused our credentials"):
        DicomwebSource(wrong_password).search_series()
    not_the_root = source(orthanc.url + "/dicom", auth="basic", username=USER, password=PASSWORD)
    with pytest.raises(SourceRefused, match=r"HTTP 404: check that url is the DICOMweb root"):
        DicomwebSource(not_the_root).search_series()
    # An Orthanc whose HTTP filter forbids DICOMweb to every account: HTTP 403.
    script = tmp_path / "no-dicomweb.lua"
    script.write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
        '  return not string.find(uri, "^/dicom%-web")\n'
        "end\n"
    )
    forbidding = Orthanc(tmp_path / "forbidding", free_port(), free_port(),
                         extra={"LuaScripts": [str(script)]}).start()
    try:
        with pytest.raises(SourceRefused, match=r"HTTP 403: .* check the account's permissions"):
            DicomwebSource(source(forbidding.dicomweb_url)).search_series()
    finally:
        forbidding.stop()


# ------------------------------------------------------------------------------------------
# What an archive holds at the first poll, and a series still being uploaded (real Orthanc)

FIRST_POLL = datetime(2024, 1, 5, 9, 0, tzinfo=UTC)  # three days after the slide's StudyDate


@needs_orthanc
def test_the_first_poll_takes_the_recent_week_of_an_archive_and_later_arrivals_whatever_their_date(
    open_orthanc, slide, sessions, tmp_path
):
    def older(seed: int, date: str) -> SyntheticSlide:
        other = write_synthetic_slide(replace(SPEC, seed=seed), tmp_path / f"slide-{seed}")
        put(open_orthanc, *(rewritten(p, StudyDate=date) for p in other.files))
        return other

    put(open_orthanc, *slide.files)  # StudyDate 2024-01-02: within the week
    last_year = older(21, "20231201")
    undated = older(22, "")  # no StudyDate: older than any lookback
    poller = SourcePoller(
        Source("pacs-web", url=open_orthanc.dicomweb_url, first_poll_lookback_days=7),
        sessions, Spool(tmp_path / "spool"), clock=lambda: FIRST_POLL,
    )
    assert poller.poll() == 0 and poller.poll() == 1
    with sessions.begin() as s:
        states = dict(s.execute(select(PullSeries.series_instance_uid, PullSeries.state)).all())
    assert states == {
        slide.series_instance_uid: PullState.TAKEN,
        last_year.series_instance_uid: PullState.SKIPPED,
        undated.series_instance_uid: PullState.SKIPPED,
    }
    [found] = events(sessions, "poll_found")
    assert found.details["new_series"] == 1 and found.details["skipped_series"] == 2
    assert found.details["first_poll_lookback_days"] == 7

    # After the first poll the lookback is over: a study from 2023 sent today is taken.
    late = older(23, "20230101")
    assert poller.poll() == 0 and poller.poll() == 1
    retrieved = [e.series_instance_uid for e in events(sessions, "series_retrieved")]
    assert retrieved == [slide.series_instance_uid, late.series_instance_uid]
    assert count(sessions, Instance) == len(slide.files) + len(late.files)


@needs_orthanc
def test_a_series_still_growing_waits_and_a_taken_series_is_never_taken_again(
    open_orthanc, slide, sessions, tmp_path
):
    poller = SourcePoller(source(open_orthanc.dicomweb_url), sessions, Spool(tmp_path / "spool"))
    first, *rest = slide.files
    put(open_orthanc, first)  # the scanner's upload has begun
    assert poller.poll() == 0
    put(open_orthanc, *rest)  # more arrived since: not stable yet
    assert poller.poll() == 0
    assert count(sessions, Instance) == 0
    assert poller.poll() == 1  # unchanged for one poll: taken whole
    assert count(sessions, Instance) == len(slide.files)

    # The series grows after it was taken (a rescan adds an instance): never fetched again.
    put(open_orthanc, rewritten(first, SOPInstanceUID=generate_uid()))
    [series] = open_orthanc.series_of_study(slide.study_instance_uid)
    assert len(series["Instances"]) == len(slide.files) + 1  # Orthanc does list it
    assert poller.poll() == 0 and poller.poll() == 0
    assert len(events(sessions, "series_retrieved")) == 1
    assert count(sessions, Instance) == len(slide.files)


# ------------------------------------------------------------------------------------------
# A local DICOMweb stand-in for what Orthanc cannot do: bearer tokens, HTTP 503, a body cut short


@dataclass
class FakeDicomweb:
    """Serves one series by QIDO-RS / WADO-RS from files; records the Authorization headers."""

    files: list[Path]
    study: str
    series: str
    status: int = 200
    truncate: bool = False
    authorizations: list[str] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def start(self) -> FakeDicomweb:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # STOW-RS: take the body, answer "all stored"
                fake.authorizations.append(self.headers.get("Authorization", ""))
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_GET(self) -> None:
                fake.authorizations.append(self.headers.get("Authorization", ""))
                if fake.status != 200:
                    self.send_error(fake.status)
                    return
                if self.path.startswith("/dicom-web/series?"):
                    body = json.dumps([{
                        "0020000D": {"vr": "UI", "Value": [fake.study]},
                        "0020000E": {"vr": "UI", "Value": [fake.series]},
                        "00201209": {"vr": "IS", "Value": [len(fake.files)]},
                    }]).encode()
                    content_type = "application/dicom+json"
                else:
                    assert self.headers["Accept"] == WADO_ACCEPT
                    body = b"".join(
                        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
                        for p in fake.files
                    ) + b"--XyZ--\r\n"
                    if fake.truncate:
                        body = body[: len(body) - 500]
                    content_type = 'multipart/related; type="application/dicom"; boundary=XyZ'
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fake(slide) -> Iterator[FakeDicomweb]:
    server = FakeDicomweb(list(slide.files), slide.study_instance_uid, slide.series_instance_uid).start()
    yield server
    server.stop()


def test_a_bearer_token_is_sent_with_every_request(fake, slide, sessions, tmp_path):
    poller = SourcePoller(
        source(fake.url, auth="bearer", token="tok-123"), sessions, Spool(tmp_path / "spool")
    )
    assert poller.poll() == 0
    assert poller.poll() == 1
    assert count(sessions, Instance) == len(slide.files)
    assert len(fake.authorizations) == 3  # QIDO, QIDO, WADO
    assert set(fake.authorizations) == {"Bearer tok-123"}


def test_a_body_cut_short_or_a_server_down_leaves_the_series_for_the_next_poll(
    fake, slide, sessions, tmp_path, caplog
):
    spool = Spool(tmp_path / "spool")
    poller = SourcePoller(source(fake.url), sessions, spool)
    fake.truncate = True
    assert poller.poll() == 0
    assert poller.poll() == 0  # retrieved, but the body was cut short: nothing recorded
    assert count(sessions, Instance) == 0
    assert list(spool.incoming_dir.iterdir()) == []
    [failed] = events(sessions, "poll_failed")
    assert "truncated" in failed.details["error"]

    fake.status = 503  # down for maintenance
    assert poller.poll() == 0
    assert "HTTP 503" in pull_state(sessions, "pacs-web").last_error

    fake.status, fake.truncate = 200, False  # back
    with caplog.at_level(logging.INFO, logger="glio_node.pull"):
        assert poller.poll() == 1
    assert count(sessions, Instance) == len(slide.files)
    assert pull_state(sessions, "pacs-web").last_error is None
    assert "polling works again" in caplog.text
    assert len(events(sessions, "poll_failed")) == 2  # one per distinct error


# ------------------------------------------------------------------------------------------
# STOW-RS results go out with the same Authorization header


@needs_orthanc
def test_stow_rs_results_reach_a_protected_orthanc_with_basic_auth(orthanc, tmp_path):
    other = write_synthetic_slide(replace(SPEC, seed=11), tmp_path)
    good = Destination("stow", type="dicomweb", url=orthanc.dicomweb_url, username=USER, password=PASSWORD)
    assert all(r.ok for r in StowSender(good).send(list(other.files)))
    bad = replace(good, password="nope")
    assert {r.status for r in StowSender(bad).send(list(other.files))} == {"HTTP 401"}


def test_stow_rs_sends_the_bearer_token(fake, slide):
    dest = Destination("stow", type="dicomweb", url=fake.url, bearer_token="tok-9")
    assert all(r.ok for r in StowSender(dest).send(list(slide.files)))
    assert fake.authorizations == ["Bearer tok-9"]


def test_a_server_that_is_not_there_is_tried_again_at_each_poll_and_reported_once(sessions, tmp_path):
    poller = SourcePoller(source(f"http://127.0.0.1:{free_port()}/dicom-web"), sessions, Spool(tmp_path / "s"))
    assert [poller.poll() for _ in range(3)] == [0, 0, 0]
    [failed] = events(sessions, "poll_failed")
    assert "QIDO-RS search failed" in failed.details["error"]
    assert "trying again at the next poll" in failed.details["error"]
    assert pull_state(sessions, "pacs-web").last_success_at is None  # first poll still to come
