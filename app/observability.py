"""Prometheus metrics: HTTP requests (middleware) and job/registry state (read from the DB at scrape).

Job counts and durations come from the job table, not from in-process counters, so every
API replica reports the same numbers whichever process ran the jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import Composition, Job, JobStatus, Model, Module

log = logging.getLogger(__name__)

JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    def __init__(self, factory: sessionmaker[Session]) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mwt_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mwt_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.registry.register(RegistryCollector(factory))


class RegistryCollector(Collector):
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        try:
            with self.factory() as s:
                by_state = dict(
                    s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                dur_cols = [
                    func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in JOB_DURATION_BUCKETS
                ]
                durations = s.execute(
                    select(Job.kind, Job.status, func.count(), func.sum(Job.duration_s), *dur_cols)
                    .where(
                        Job.duration_s.is_not(None),
                        Job.status.in_(["succeeded", "failed", "cancelled"]),
                    )
                    .group_by(Job.kind, Job.status)
                ).all()
                models = dict(
                    s.execute(select(Model.status, func.count()).group_by(Model.status)).all()
                )
                modules = s.scalar(select(func.count()).select_from(Module)) or 0
                unsent = (
                    s.scalar(
                        select(func.count())
                        .select_from(Job)
                        .where(Job.status == "queued", Job.dispatched_at.is_(None))
                    )
                    or 0
                )
                compositions = s.scalar(select(func.count()).select_from(Composition)) or 0
        except Exception:
            log.exception("metrics: registry query failed")
            return
        jobs = GaugeMetricFamily("mwt_jobs", "Jobs by state", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield jobs
        hist = HistogramMetricFamily(
            "mwt_job_duration_seconds",
            "Wall time of finished jobs (first start to end)",
            labels=["kind", "status"],
        )
        for kind, status, count, total, *cum in durations:
            buckets = [
                (str(float(b)), float(c or 0))
                for b, c in zip(JOB_DURATION_BUCKETS, cum, strict=True)
            ]
            buckets.append(("+Inf", float(count)))
            hist.add_metric([kind, status], buckets, float(total or 0.0))
        yield hist
        g = GaugeMetricFamily("mwt_models", "Registered models by status", labels=["status"])
        for status, n in models.items():
            g.add_metric([status], float(n))
        yield g
        yield GaugeMetricFamily("mwt_modules", "Registered modules", value=float(modules))
        yield GaugeMetricFamily(
            "mwt_jobs_unsent",
            "Queued jobs not (yet) handed to the broker; growing means the broker is unreachable",
            value=float(unsent),
        )
        yield GaugeMetricFamily("mwt_compositions", "Stored compositions", value=float(compositions))


def route_template(scope: Scope) -> str:
    """The matched route's path template with its router prefixes, e.g. ``{API_PREFIX}/modules/{module_id}``."""
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "unmatched"
    try:
        suffix = template.format(**scope.get("path_params", {}))
    except (KeyError, IndexError, ValueError):
        return template
    path = scope.get("path", "")
    return path[: len(path) - len(suffix)] + template if path.endswith(suffix) else template


class MetricsMiddleware:
    """Counts requests and their latency per route template (not per raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status[0])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
