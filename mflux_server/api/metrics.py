"""GET /metrics: Prometheus text from the queue file, so every server process answers the same figures."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from mflux_server.api.context import db, settings
from mflux_server.api.task_view import live_workers

blp = Blueprint("metrics", __name__, description="Prometheus metrics (needs a key once keys exist).")

HISTOGRAMS = {
    "generation_seconds": "seconds from a task's start to its images stored, by model",
    "step_seconds": "seconds of one denoising step, by model",
    "queue_wait_seconds": "seconds from submit to start, by model",
    "forecast_ratio": "actual seconds from submit to done ÷ the forecast at submit, by model (1 is exact)",
}


class QueueCollector:
    """Reads the metrics tables and the queue at each scrape (prometheus_client calls collect())."""

    def collect(self) -> Iterator[Metric]:
        """Every metric, from one read of the queue file."""
        rows = db().metric_rows()
        tasks = GaugeMetricFamily("mflux_tasks", "tasks in the queue now, by status and model", labels=["status", "model"])
        for status, model, count in rows["tasks"]:
            tasks.add_metric([str(status), str(model)], float(count))  # type: ignore[arg-type]
        yield tasks
        finished = CounterMetricFamily("mflux_tasks_finished", "tasks that ended, by outcome", labels=["outcome"])
        deliveries = CounterMetricFamily("mflux_webhook_deliveries", "webhooks that ended, by state (delivered, failed)",
                                         labels=["state"])
        attempts = CounterMetricFamily("mflux_webhook_attempts", "webhook POSTs attempted")
        for name, label, value in rows["counters"]:
            if name == "tasks_finished":
                finished.add_metric([str(label)], float(value))  # type: ignore[arg-type]
            elif name == "webhook_deliveries":
                deliveries.add_metric([str(label)], float(value))  # type: ignore[arg-type]
            elif name == "webhook_attempts":
                attempts.add_metric([], float(value))  # type: ignore[arg-type]
        yield from (finished, deliveries, attempts)
        yield GaugeMetricFamily("mflux_webhook_pending", "webhooks not yet delivered or given up",
                                value=float(rows["pending_deliveries"][0][0]))  # type: ignore[arg-type]
        yield from histograms(rows)
        live = live_workers(db())
        yield GaugeMetricFamily("mflux_workers_alive", "workers that heartbeated within --stale-after",
                                value=float(len(live)))
        loaded = GaugeMetricFamily("mflux_worker_model_loaded", "1 for each live worker's loaded model",
                                   labels=["worker", "model", "engine"])
        for worker in live:
            loaded.add_metric([worker.id, worker.model, worker.engine], 1.0)
        yield loaded
        pages, page_size = rows["pages"][0]
        wal = settings().db + "-wal"
        size = int(pages) * int(page_size) + (os.path.getsize(wal) if os.path.exists(wal) else 0)  # type: ignore[call-overload]
        yield GaugeMetricFamily("mflux_database_bytes", "size of the queue file and its WAL", value=float(size))


def histograms(rows: dict[str, list[tuple[Any, ...]]]) -> Iterator[Metric]:
    """The histograms, cumulative buckets as stored, per model."""
    sums = {(name, model): (total, count) for name, model, total, count in rows["sums"]}
    for name, documentation in HISTOGRAMS.items():
        family = HistogramMetricFamily(f"mflux_{name}", documentation, labels=["model"])
        by_model: dict[str, list[tuple[str, float]]] = {}
        for bucket_name, model, le, count in rows["buckets"]:
            if bucket_name == name:
                by_model.setdefault(model, []).append(("+Inf" if math.isinf(le) else repr(float(le)), float(count)))
        for model, buckets in sorted(by_model.items()):
            total, _ = sums.get((name, model), (0.0, 0))
            family.add_metric([model], buckets, sum_value=float(total))
        yield family


def registry() -> CollectorRegistry:
    """This app's registry, holding the queue collector (made once per process)."""
    found: CollectorRegistry | None = current_app.extensions.get("mflux_metrics")
    if found is None:
        found = CollectorRegistry(auto_describe=False)
        found.register(QueueCollector())
        current_app.extensions["mflux_metrics"] = found
    return found


@blp.route("/metrics")
class Metrics(MethodView):
    """Prometheus metrics."""

    @blp.doc(responses={"200": {"description": "Prometheus text exposition format",
                                "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def get(self) -> Response:
        """Tasks by status and model, outcomes, generation, step, wait and forecast-error histograms, workers,
        webhooks and the queue file's size."""
        return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
