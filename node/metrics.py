"""Prometheus metrics of one running node, in a registry of its own.

A registry per node, not prometheus-client's global one, so that several nodes in one
process (tests, the simulation) each count only their own messages. Counters and
histograms are updated by the runner as things happen; gauges that describe stored state
(outbox backlog, open loops, queue depths) are set from the store and the broker when
``/metrics`` is scraped, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from node.status import AGE_BUCKETS

#: seconds: a batch of deliveries is decided and committed in milliseconds normally;
#: a slow disk or a locked database shows in the upper buckets
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_in = Counter("kpx_messages_in", "Messages taken from the inbox, by "
                                   "kind and outcome", ["kind", "outcome"], registry=r)
        self.messages_out = Counter("kpx_messages_out", "Messages confirmed by the broker, "
                                    "by kind", ["kind"], registry=r)
        self.rejections = Counter("kpx_rejections", "Incoming messages refused, by reason "
                                  "code", ["reason"], registry=r)
        self.dead_letters = Counter("kpx_dead_letters", "Messages this node put on its "
                                    "dead-letter queue, by reason code", ["reason"],
                                    registry=r)
        self.publish_failures = Counter("kpx_publish_failures", "Outbox messages the broker "
                                        "did not take (unroutable, nacked, errors)",
                                        ["kind", "error"], registry=r)
        self.batch_seconds = Histogram("kpx_batch_processing_seconds", "Time to decide and "
                                       "commit one batch of deliveries", registry=r,
                                       buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("kpx_batch_size", "Deliveries per batch", registry=r,
                                    buckets=(1, 2, 5, 10, 25, 50, 100, 256, 512))
        self.publish_seconds = Histogram("kpx_publish_seconds", "Time to publish one outbox "
                                         "batch with confirms", registry=r,
                                         buckets=LATENCY_BUCKETS)
        self.outbox_backlog = Gauge("kpx_outbox_backlog", "Outbox messages not yet "
                                    "confirmed by the broker, by recipient", ["recipient"],
                                    registry=r)
        self.outbox_oldest = Gauge("kpx_outbox_oldest_age_seconds", "Age of the oldest "
                                   "unsent outbox message (0 when empty)", registry=r)
        self.unanswered = Gauge("kpx_unanswered_certificates", "Certificates sent again "
                                "for want of a receipt and still without one, by partner "
                                "(its node does not answer)", ["partner"], registry=r)
        self.open_loops = Gauge("kpx_open_loops", "Open certificate loops by side and days "
                                "since issue", ["side", "age"], registry=r)
        self.expired = Gauge("kpx_expired_certificates", "Certificates expired without "
                             "confirmation", ["side"], registry=r)
        self.unreadable_records = Gauge(
            "kpx_unreadable_records", "Open or expired records kpx cannot read (changed "
            "outside kpx: restore from a backup); left out of kpx_open_loops", registry=r)
        self.inbox_depth = Gauge("kpx_inbox_messages", "Messages waiting in the inbox queue "
                                 "(-1: broker not asked)", registry=r)
        self.dead_letter_depth = Gauge("kpx_dead_letter_queue_messages", "Messages in the "
                                       "dead-letter queue (-1: broker not asked)", registry=r)
        self.broker_connected = Gauge("kpx_broker_connected", "1 while connected to a "
                                      "broker", registry=r)
        self.consuming = Gauge("kpx_consuming", "1 while consuming the inbox", registry=r)
        self.publishing_allowed = Gauge("kpx_publishing_allowed", "1 while connected and "
                                        "the broker does not block publishing (0 during a "
                                        "resource alarm: low on disk or memory)", registry=r)
        self.store_ok = Gauge("kpx_store_ok", "1 while the database commits", registry=r)
        self.registry_version = Gauge("kpx_registry_version", "Version of the registry in "
                                      "force", registry=r)

    def received(self, kind: str | None, duplicate: bool, refusal_reason: str | None,
                 held: bool = False) -> None:
        """One message taken; ``held``: refused for now only (machine.Refusal.final)."""
        outcome = ("duplicate" if duplicate else "held" if held
                   else "refused" if refusal_reason else "accepted")
        self.messages_in.labels(kind=kind or "unreadable", outcome=outcome).inc()
        if refusal_reason is not None and not duplicate:  # counted when first refused
            self.rejections.labels(reason=refusal_reason).inc()

    def set_outbox(self, pending: Sequence[tuple[str, int, int]], now_ms: int) -> None:
        """``pending``: (recipient, messages, oldest created_at ms) per recipient."""
        self.outbox_backlog.clear()
        for recipient, messages, _ in pending:
            self.outbox_backlog.labels(recipient=recipient).set(messages)
        oldest = min((o for _, _, o in pending), default=None)
        self.outbox_oldest.set(0 if oldest is None else max(0, now_ms - oldest) / 1000)

    def set_unanswered(self, unanswered: Sequence[tuple[str, int, int]]) -> None:
        """``unanswered``: (partner, certificates, oldest created_at ms) per partner."""
        self.unanswered.clear()  # a partner that answered again drops out, not stays at n
        for partner, certificates, _ in unanswered:
            self.unanswered.labels(partner=partner).set(certificates)

    def set_loops(self, by_side_age: Mapping[tuple[str, str], int],
                  expired: Mapping[str, int]) -> None:
        for side in ("export", "import"):
            for age, _ in AGE_BUCKETS:
                self.open_loops.labels(side=side, age=age).set(by_side_age.get((side, age), 0))
            self.expired.labels(side=side).set(expired.get(side, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
