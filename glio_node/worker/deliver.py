"""Result objects to the destinations: claimed with a lease, one batch per destination.

Every second the node claims due deliveries (``DELIVERY_BATCH`` at most, each claim good for
``DELIVERY_LEASE_SECONDS`` so no other node sends it meanwhile) and sends each destination's
share in one association or STOW-RS request (:mod:`glio_node.send`).  Each object's outcome is
recorded with its audit row (:func:`glio_node.store.deliveries.record_attempt`): sent, pending
again with backoff, or failed once ``delivery_max_attempts`` are used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from glio_node.config import Destination
from glio_node.errors import TransientError
from glio_node.redact import redacted_logger
from glio_node.send import ResultSender, SendResult
from glio_node.store import deliveries
from glio_node.worker.context import WorkContext

log = redacted_logger(__name__)

DELIVERY_LEASE_SECONDS = 300.0  # a claimed delivery is not sent by another node for this long
DELIVERY_BATCH = 64  # objects per association / STOW-RS request

SenderFactory = Callable[[Destination, str], ResultSender]  # (destination, our AE title)


def deliver(work: WorkContext, sender_factory: SenderFactory) -> None:
    """Send due result objects: one batch per destination."""
    if work.stopping.is_set():
        return
    with work.sessions.begin() as session:
        claimed = deliveries.claim_deliveries(
            session, work.now(), DELIVERY_LEASE_SECONDS, DELIVERY_BATCH, work.owner
        )
    by_destination: dict[str, list[deliveries.DeliveryRecord]] = defaultdict(list)
    for item in claimed:
        by_destination[item.destination].append(item)
    for name, items in by_destination.items():
        _deliver_batch(work, sender_factory, name, items)


def _deliver_batch(
    work: WorkContext, sender_factory: SenderFactory, name: str, items: list[deliveries.DeliveryRecord]
) -> None:
    destination = work.destinations.get(name)
    paths = [Path(i.path) for i in items]
    results: list[SendResult]
    if destination is None:
        results = [SendResult(p, False, "destination not configured") for p in paths]
    elif missing := [p for p in paths if not p.is_file()]:
        results = [
            SendResult(p, False, "result file missing") if p in missing
            else SendResult(p, False, "batch not sent", transient=True)
            for p in paths
        ]
    else:
        try:
            sender = sender_factory(destination, work.settings.node.ae_title)
            results = sender.send(paths)
        except TransientError as exc:
            results = [SendResult(p, False, "unreachable", transient=True) for p in paths]
            log.warning("destination %s: %s; %d object(s) will be retried", name, exc, len(paths))
    now = work.now()
    max_attempts = work.settings.worker.delivery_max_attempts
    policy = work.policy
    states: dict[str, int] = defaultdict(int)
    with work.sessions.begin() as session:
        for item, result in zip(items, results, strict=True):
            state = deliveries.record_attempt(
                session, item, ok=result.ok, status=result.status,
                transient=result.transient, now=now, policy=policy,
                max_attempts=max_attempts,
            )
            states[state.value] += 1
    jobs = sorted({i.job_id for i in items})
    log.info(
        "delivery to %s for job(s) %s: %s",
        name, ", ".join(map(str, jobs)), ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
    )
