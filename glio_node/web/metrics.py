"""/metrics for Prometheus, read from the store at scrape time.

A collector (not process-local counters) so that the numbers are the same whichever node or
``status-page`` process is scraped, and survive restarts: jobs by state, stage durations as
histograms (from every finished job's stage times), instances and bytes received, deliveries by
outcome, queue depth and the spool's free bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from glio_node.web import snapshot
from glio_node.web.health import NodeContext, spool_free_bytes

STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class StoreCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], ctx: NodeContext):
        self.sessions = sessions
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            states = snapshot.job_states(session)
            stages = snapshot.stage_durations(session)
            instances, size = snapshot.received_totals(session)
            outcomes = snapshot.delivery_outcomes(session)
            running = snapshot.running_jobs(session, datetime.now(UTC))
        jobs = GaugeMetricFamily("glio_jobs", "Jobs by state", labels=["state"])
        for state, n in states.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("glio_queue_depth", "Jobs waiting to run", value=states.get("waiting", 0))
        yield GaugeMetricFamily("glio_jobs_running", "Jobs running on any node", value=len(running))
        hist = HistogramMetricFamily(
            "glio_stage_duration_seconds", "Time per pipeline stage of finished jobs", labels=["stage"]
        )
        for stage, values in sorted(stages.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in STAGE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            hist.add_metric([stage], buckets, sum_value=sum(values))
        yield hist
        yield CounterMetricFamily("glio_instances_received", "Instances received and stored", value=instances)
        yield CounterMetricFamily("glio_received_bytes", "Bytes of instances received and stored", value=size)
        deliveries = GaugeMetricFamily("glio_deliveries", "Result deliveries by outcome", labels=["outcome"])
        for state, n in outcomes.items():
            deliveries.add_metric([state], n)
        yield deliveries
        free = spool_free_bytes(self.ctx)
        if free is not None:
            yield GaugeMetricFamily("glio_spool_free_bytes", "Free bytes on the spool's filesystem", value=free)


def make_registry(sessions: sessionmaker[Session], ctx: NodeContext) -> CollectorRegistry:
    """A registry of its own per app (never the global one: tests build several apps)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(sessions, ctx))
    return registry
