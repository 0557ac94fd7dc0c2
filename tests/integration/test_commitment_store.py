"""Storage Commitment in the store, on SQLite and the real PostgreSQL: a job's results on a
destination with commitment stay on the spool until the destination's report commits them;
failed objects are sent again (capped); unanswered or refused requests are asked again (capped).

The database fixtures (``database_url``, ``sessions``) are test_store's; ``postgres_url`` is tests/conftest.py's.
"""
# ruff: noqa: F811 - the imported fixtures are, as pytest intends, redefined as parameters

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from test_store import (  # noqa: F401 - fixtures
    BUNDLE,
    POLICY,
    T0,
    database_url,
    events,
    queued,
    sessions,
)

from glio_node.store import commitments, deliveries
from glio_node.store.models import (
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryState,
    StorageCommitment,
)
from glio_node.store.queue import claim_job, finish_job

SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
OBJECTS = [
    deliveries.ResultObject("2.25.1001", SEG, "/spool/results/seg.dcm"),
    deliveries.ResultObject("2.25.1002", SR, "/spool/results/sr.dcm"),
]


def delivered_job(sessions, series: str = "1.2.3.4", destinations=("pacs", "web")) -> int:
    """A done job whose two results were sent to every destination (one send each)."""
    job_id = queued(sessions, series)
    with sessions.begin() as s:
        claim_job(s, "node-a", 60, T0)
        finish_job(s, job_id, "node-a", T0, bundle=BUNDLE)
        deliveries.add_deliveries(s, job_id, list(destinations), OBJECTS, T0)
    with sessions.begin() as s:
        for item in deliveries.claim_deliveries(s, T0, 60):
            deliveries.record_attempt(
                s, item, ok=True, status="0x0000", transient=False, now=T0, policy=POLICY,
                max_attempts=3,
            )
    return job_id


def states(sessions, job_id: int, destination: str = "pacs") -> dict[str, str]:
    with sessions.begin() as s:
        return {
            d.sop_instance_uid: d.state.value
            for d in s.scalars(
                select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
            )
        }


def purgeable(sessions, needs=("pacs",)) -> list[int]:
    with sessions.begin() as s:
        return [p.job_id for p in deliveries.purgeable_jobs(s, T0 + timedelta(days=1), needs)]


def open_requests(sessions, now=T0, max_requests: int = 5):
    with sessions.begin() as s:
        return commitments.open_requests(s, ["pacs"], now, max_requests=max_requests)


def report(sessions, transaction_uid: str, committed=(), failed=None, max_attempts: int = 3):
    with sessions.begin() as s:
        return commitments.record_report(
            s, transaction_uid, list(committed), failed or {}, T0 + timedelta(seconds=5),
            max_attempts=max_attempts, calling_ae="ORTHANC", address="127.0.0.1:4242",
        )


def audit_details(sessions, event: str) -> list[dict]:
    with sessions.begin() as s:
        return [
            e.details
            for e in s.scalars(
                select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)
            )
        ]


def test_sent_is_not_enough_to_purge_until_the_destination_commits(sessions):
    job_id = delivered_job(sessions)
    assert purgeable(sessions, needs=()) == [job_id]  # without commitment, sent is delivered
    assert purgeable(sessions) == []  # "pacs" wants commitment

    [request] = open_requests(sessions)
    assert request.job_id == job_id and request.destination == "pacs" and request.attempt == 1
    assert set(request.references) == {(SEG, "2.25.1001"), (SR, "2.25.1002")}
    assert open_requests(sessions) == []  # one request at a time, while it waits for its answer

    outcome = report(sessions, request.transaction_uid, committed=["2.25.1001", "2.25.1002"])
    assert (outcome.committed, outcome.resend, outcome.unknown) == (2, 0, 0)
    assert states(sessions, job_id) == {"2.25.1001": "committed", "2.25.1002": "committed"}
    assert set(states(sessions, job_id, "web").values()) == {"sent"}  # other destination untouched
    assert purgeable(sessions) == [job_id]
    assert open_requests(sessions, now=T0 + timedelta(hours=1)) == []  # nothing left to commit
    with sessions.begin() as s:
        [row] = commitments.requests_of(s, job_id)
        assert row.state == CommitmentState.CONFIRMED and row.answered_at == T0 + timedelta(seconds=5)
        assert all(d.committed_at is not None for d in s.scalars(
            select(Delivery).where(Delivery.destination == "pacs")))
    assert events(sessions, job_id)[-2:] == ["commitment_requested", "commitment_confirmed"]
    [confirmed] = audit_details(sessions, "commitment_confirmed")
    assert confirmed == {"destination": "pacs", "transaction_uid": request.transaction_uid,
                         "committed": 2, "referenced": 2}


def test_failed_objects_are_sent_again_and_committed_by_a_second_request(sessions):
    job_id = delivered_job(sessions)
    [first] = open_requests(sessions)
    outcome = report(sessions, first.transaction_uid, committed=["2.25.1001"],
                     failed={"2.25.1002": 0x0110})
    assert (outcome.committed, outcome.resend, outcome.given_up) == (1, 1, 0)
    assert states(sessions, job_id) == {"2.25.1001": "committed", "2.25.1002": "pending"}
    assert purgeable(sessions) == []
    assert open_requests(sessions, now=T0 + timedelta(seconds=6)) == []  # not while one is pending
    [failed] = audit_details(sessions, "commitment_failed")
    assert failed["reason"] == "failed_objects" and failed["resend"] == 1
    assert failed["failures"] == [{"sop_instance_uid": "2.25.1002", "failure_reason": 0x0110}]

    # The sender sends it again; then the node asks for that object only.
    with sessions.begin() as s:
        [again] = deliveries.claim_deliveries(s, T0 + timedelta(seconds=6), 60)
        assert again.sop_instance_uid == "2.25.1002" and again.attempts == 1
        deliveries.record_attempt(s, again, ok=True, status="0x0000", transient=False,
                                  now=T0 + timedelta(seconds=7), policy=POLICY, max_attempts=3)
    [second] = open_requests(sessions, now=T0 + timedelta(seconds=8))
    assert second.attempt == 2 and second.references == ((SR, "2.25.1002"),)
    report(sessions, second.transaction_uid, committed=["2.25.1002"])
    assert purgeable(sessions) == [job_id]


def test_an_object_that_keeps_failing_is_given_up_after_max_attempts(sessions):
    job_id = delivered_job(sessions)
    [request] = open_requests(sessions)
    outcome = report(sessions, request.transaction_uid, committed=["2.25.1001"],
                     failed={"2.25.1002": 0x0112}, max_attempts=1)  # it was sent once already
    assert (outcome.resend, outcome.given_up) == (0, 1)
    assert states(sessions, job_id)["2.25.1002"] == "failed"
    with sessions.begin() as s:
        d = s.scalars(select(Delivery).where(Delivery.sop_instance_uid == "2.25.1002",
                                             Delivery.destination == "pacs")).one()
        assert d.last_status == "commitment failed: 0x0112 no such object instance"
    assert purgeable(sessions) == []  # a failed delivery never lets the spool go


def test_no_report_in_time_expires_the_request_and_asks_again_after_the_backoff(sessions):
    job_id = delivered_job(sessions)
    [first] = open_requests(sessions)
    with sessions.begin() as s:
        assert commitments.expire_requests(s, {"pacs": 60}, T0 + timedelta(seconds=59), POLICY,
                                           max_requests=2) == []
        assert commitments.expire_requests(s, {"pacs": 60}, T0 + timedelta(seconds=61), POLICY,
                                           max_requests=2) == [(job_id, "pacs")]
    [expired] = audit_details(sessions, "commitment_failed")
    assert expired["reason"] == "no_report" and expired["attempt"] == 1
    retry_at = T0 + timedelta(seconds=61) + POLICY.delay(1)
    assert expired["retry_at"] == retry_at.isoformat()
    assert open_requests(sessions, now=retry_at - timedelta(seconds=1), max_requests=2) == []
    [second] = open_requests(sessions, now=retry_at, max_requests=2)
    assert second.attempt == 2 and second.transaction_uid != first.transaction_uid

    # The second is refused: with max_requests 2 the node stops asking (and still keeps the job).
    with sessions.begin() as s:
        assert commitments.record_refusal(s, second, "association rejected", retry_at, POLICY,
                                          max_requests=2) is None
    refused = audit_details(sessions, "commitment_failed")[-1]
    assert refused["reason"] == "n_action_refused" and refused["gave_up"] is True
    assert refused["status"] == "association rejected"
    assert open_requests(sessions, now=retry_at + timedelta(days=1), max_requests=2) == []
    assert purgeable(sessions) == []
    # Given up: the deliveries read failed ("not committed"), so the page and /metrics show them.
    assert set(states(sessions, job_id).values()) == {"failed"}
    gave_up = audit_details(sessions, "commitment_failed")[-1]
    assert gave_up["given_up_after_requests"] == 2 and gave_up["objects"] == 2

    # A late answer to the first request still counts: the destination has the objects.
    report(sessions, first.transaction_uid, committed=["2.25.1001", "2.25.1002"])
    assert purgeable(sessions) == [job_id]
    with sessions.begin() as s:
        rows = commitments.requests_of(s, job_id)
        assert [r.state for r in rows] == [CommitmentState.CONFIRMED, CommitmentState.REFUSED]


def test_a_report_for_a_transaction_never_requested_changes_nothing(sessions):
    job_id = delivered_job(sessions)
    open_requests(sessions)
    assert report(sessions, "2.25.999", committed=["2.25.1001"]) is None
    assert set(states(sessions, job_id).values()) == {"sent"}
    with sessions.begin() as s:
        assert s.scalars(select(StorageCommitment.state)).all() == [CommitmentState.REQUESTED]


def test_pending_deliveries_are_not_asked_for(sessions):
    job_id = queued(sessions, "1.2.3.9")
    with sessions.begin() as s:
        claim_job(s, "node-a", 60, T0)
        finish_job(s, job_id, "node-a", T0, bundle=BUNDLE)
        deliveries.add_deliveries(s, job_id, ["pacs"], OBJECTS, T0)
    assert open_requests(sessions) == []  # nothing sent yet
    assert states(sessions, job_id) == {"2.25.1001": DeliveryState.PENDING.value,
                                        "2.25.1002": DeliveryState.PENDING.value}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_two_nodes_opening_the_same_request_collide_on_the_attempt(sessions):
    from sqlalchemy.exc import IntegrityError

    delivered_job(sessions)
    s1, s2 = sessions(), sessions()
    try:
        with s1.begin():
            commitments.open_requests(s1, ["pacs"], T0, max_requests=5)
        with pytest.raises(IntegrityError), s2.begin():
            # s2 decided from the same snapshot: simulate by inserting the same attempt number.
            s2.add(StorageCommitment(job_id=1, destination="pacs", attempt=1,
                                     transaction_uid="2.25.77", state=CommitmentState.REQUESTED,
                                     sop_instance_uids=[], requested_at=T0))
    finally:
        s1.close()
        s2.close()


def test_after_giving_up_a_resend_of_the_results_asks_for_commitment_afresh(sessions):
    from glio_node.store.actions import resend_job

    job_id = delivered_job(sessions)
    [first] = open_requests(sessions, max_requests=1)
    with sessions.begin() as s:
        commitments.record_refusal(s, first, "association rejected", T0, POLICY, max_requests=1)
    later = T0 + timedelta(hours=1)
    assert open_requests(sessions, now=later, max_requests=1) == []  # gives up...
    assert set(states(sessions, job_id).values()) == {"failed"}  # ...visibly

    # The operator fixes the PACS and re-sends: sent again, so the node asks again.
    with sessions.begin() as s:
        resend_job(s, job_id, later, by="it-desk", address=None)
    with sessions.begin() as s:
        for item in deliveries.claim_deliveries(s, later, 60):
            deliveries.record_attempt(
                s, item, ok=True, status="0x0000", transient=False, now=later, policy=POLICY,
                max_attempts=3,
            )
    [again] = open_requests(sessions, now=later + timedelta(seconds=1), max_requests=2)
    assert again.attempt == 2
    # The new round counts its own misses: a refusal now is the first of two, so it backs off.
    with sessions.begin() as s:
        retry_at = commitments.record_refusal(
            s, again, "association rejected", later, POLICY, max_requests=2
        )
    assert retry_at == later + POLICY.delay(1)
    assert open_requests(sessions, now=retry_at - timedelta(seconds=1), max_requests=2) == []
    [third] = open_requests(sessions, now=retry_at, max_requests=2)
    report(sessions, third.transaction_uid, committed=["2.25.1001", "2.25.1002"])
    assert purgeable(sessions) == [job_id]


def test_a_report_from_another_ae_title_than_the_destination_changes_nothing(sessions):
    job_id = delivered_job(sessions)
    [request] = open_requests(sessions)
    with sessions.begin() as s:
        outcome = commitments.record_report(
            s, request.transaction_uid, ["2.25.1001", "2.25.1002"], {}, T0, max_attempts=3,
            calling_ae="INTRUDER", address="10.0.0.66:104", reporters={"pacs": "ORTHANC"},
        )
    assert outcome is None
    assert set(states(sessions, job_id).values()) == {"sent"} and purgeable(sessions) == []
    with sessions.begin() as s:  # the destination's own AE title is heard
        assert commitments.record_report(
            s, request.transaction_uid, ["2.25.1001", "2.25.1002"], {}, T0, max_attempts=3,
            calling_ae="ORTHANC", address="127.0.0.1:4242", reporters={"pacs": "ORTHANC"},
        ) is not None
    assert purgeable(sessions) == [job_id]
