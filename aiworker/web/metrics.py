"""``/metrics``: the node in Prometheus text format, read from the state DB at each scrape.

Every figure but one comes from the state DB (:func:`aiworker.store.stats.read_stats`), so
it counts the work of every process of the node (``node.receive_processes > 1``, the
inference process) and carries over restarts: the ``_total`` counters count since the data
dir was made.

============================================  =========================================
``aiworker_instances_received_total``         instances stored (each SOP Instance UID once)
``aiworker_received_bytes_total``             their bytes on disk
``aiworker_associations_active``              TCP connections open on the DICOM port now
                                              (one per association; Linux /proc/net/tcp)
``aiworker_associations_rejected_total``      callers refused by ``node.allowed_callers``
``aiworker_cstore_failures_total{status}``    C-STORE answered with a failure, by DIMSE
                                              status (0xA700 out of resources, 0xC2xx ...)
``aiworker_series_completed_total``           series completions (a re-opened series that
                                              completes again counts again)
``aiworker_studies_completed_total``          study completions
``aiworker_series{state}``                    series by state (receiving, complete)
``aiworker_studies{state}``                   studies by state (receiving, complete)
``aiworker_jobs{state}``                      inference jobs by state (queued, running,
                                              done, failed, superseded)
``aiworker_inference_seconds``                histogram: each done job, from handing it to
                                              the inference process to its reply (model
                                              and result objects)
``aiworker_end_to_end_seconds``               histogram: each done job whose results are
                                              all sent, from the study's first instance
                                              received to the last result accepted
``aiworker_outbox_rows{destination,state}``   outbox rows (pending, sending, sent, dead)
``aiworker_outbox_depth{destination}``        rows still to send (pending + sending)
``aiworker_outbox_failed_attempts{destination}``  failed sends, summed over rows since each
                                              was last queued
``aiworker_stage_seconds{stage}``             histogram per stage: ``receive`` (a complete
                                              study's first to last instance),
                                              ``queue_wait`` (job queued to started),
                                              ``inference`` (load, model, labels),
                                              ``result_objects`` (SEG, SR, report, HL7,
                                              preview), ``send`` (job done to its last
                                              result accepted)
``aiworker_studies_purged_total{reason}``    studies removed: ``age`` (storage.retention_days),
                                              ``disk`` (emergency_free_percent),
                                              ``operator`` (aiworker purge)
``aiworker_purged_bytes_total``               the bytes of their instances
``aiworker_build_info{version,python,variant}``  1, labelled with the package version, the
                                              Python version and the image variant
                                              (``AIWORKER_VARIANT``: cpu, cuda; else
                                              ``source``)
============================================  =========================================

Histograms are rebuilt from the jobs at each scrape (one observation per job), so
``rate()`` over them works as usual as long as no job rows are removed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aiworker.store.db import StateDB
from aiworker.store.stats import NodeStats, read_stats

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INFERENCE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
END_TO_END_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_ESTABLISHED = "01"


def established_connections(port: int, tables: Iterable[Path] = TCP_TABLES) -> int | None:
    """TCP connections in state ESTABLISHED whose local port is ``port``, counted in the
    kernel's tables (all processes of this network namespace); None where there are none
    to read (not Linux)."""
    count, readable = 0, False
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_ESTABLISHED \
                    and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count if readable else None


def histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]
              ) -> HistogramMetricFamily:
    """A histogram family of ``values`` (cumulative buckets, +Inf, sum)."""
    cumulative = _cumulative(values, buckets)
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=sum(values))


def _cumulative(values: list[float], buckets: tuple[float, ...]) -> list[tuple[str, int]]:
    return [(str(float(b)), sum(v <= b for v in values)) for b in buckets] + \
        [("+Inf", len(values))]


def build_info() -> GaugeMetricFamily:
    """``aiworker_build_info``: 1, labelled with what was built and where it runs."""
    family = GaugeMetricFamily("aiworker_build_info", "The running aiworker's build",
                               labels=["version", "python", "variant"])
    family.add_metric([version("aiworker"), platform.python_version(),
                       os.environ.get("AIWORKER_VARIANT", "source")], 1)
    return family


class StateCollector(Collector):
    """Reads the state DB at each scrape and yields the node's metric families."""

    def __init__(self, db: StateDB, dicom_port: int):
        self.db = db
        self.dicom_port = dicom_port

    def collect(self) -> Iterator[Metric]:
        stats = read_stats(self.db)
        yield from self._receiving(stats)
        yield from self._stages(stats)
        yield from self._outbox(stats)
        yield from self._retention(stats)
        yield build_info()

    def _receiving(self, stats: NodeStats) -> Iterator[Metric]:
        yield CounterMetricFamily("aiworker_instances_received",
                                  "Instances received and stored (each SOP Instance UID once)",
                                  value=stats.instances)
        yield CounterMetricFamily("aiworker_received_bytes",
                                  "Bytes of the received instances on disk", value=stats.bytes)
        active = established_connections(self.dicom_port)
        if active is not None:
            yield GaugeMetricFamily("aiworker_associations_active",
                                    "TCP connections open on the DICOM port (associations)",
                                    value=active)
        yield CounterMetricFamily("aiworker_associations_rejected",
                                  "Associations rejected (caller not in node.allowed_callers)",
                                  value=stats.associations_rejected)
        failures = CounterMetricFamily("aiworker_cstore_failures",
                                       "C-STORE requests answered with a failure status",
                                       labels=["status"])
        for status, count in sorted(stats.store_failures.items()):
            failures.add_metric([status], count)
        yield failures

    def _stages(self, stats: NodeStats) -> Iterator[Metric]:
        yield CounterMetricFamily("aiworker_series_completed", "Series completions",
                                  value=stats.series_completed)
        yield CounterMetricFamily("aiworker_studies_completed", "Study completions",
                                  value=stats.studies_completed)
        for name, doc, counts in (("aiworker_series", "Series by state", stats.series),
                                  ("aiworker_studies", "Studies by state", stats.studies),
                                  ("aiworker_jobs", "Inference jobs by state", stats.jobs)):
            family = GaugeMetricFamily(name, doc, labels=["state"])
            for state, count in sorted(counts.items()):
                family.add_metric([state], count)
            yield family
        yield histogram("aiworker_inference_seconds",
                        "Done jobs: seconds from handing the job to the inference process "
                        "to its reply", stats.inference_seconds, INFERENCE_BUCKETS)
        yield histogram("aiworker_end_to_end_seconds",
                        "Done jobs with every result sent: seconds from the study's first "
                        "instance received to the last result accepted",
                        stats.end_to_end_seconds, END_TO_END_BUCKETS)
        stages = HistogramMetricFamily("aiworker_stage_seconds",
                                       "Seconds spent in each stage of the node",
                                       labels=["stage"])
        for stage, values in stats.stage_seconds.items():
            stages.add_metric([stage], _cumulative(values, STAGE_BUCKETS), sum(values))
        yield stages

    def _outbox(self, stats: NodeStats) -> Iterator[Metric]:
        rows = GaugeMetricFamily("aiworker_outbox_rows", "Outbox rows by destination and state",
                                 labels=["destination", "state"])
        depth = GaugeMetricFamily("aiworker_outbox_depth",
                                  "Outbox rows still to send (pending + sending)",
                                  labels=["destination"])
        failed = GaugeMetricFamily("aiworker_outbox_failed_attempts",
                                   "Failed sends, summed over rows since each was last queued",
                                   labels=["destination"])
        for destination, states in sorted(stats.outbox.items()):
            for state, count in sorted(states.items()):
                rows.add_metric([destination, state], count)
            depth.add_metric([destination], stats.outbox_depth(destination))
            failed.add_metric([destination], stats.outbox_failed_attempts.get(destination, 0))
        yield from (rows, depth, failed)

    def _retention(self, stats: NodeStats) -> Iterator[Metric]:
        purged = CounterMetricFamily("aiworker_studies_purged",
                                     "Studies removed by retention or an operator",
                                     labels=["reason"])
        for reason, count in sorted(stats.purged_studies.items()):
            purged.add_metric([reason], count)
        yield purged
        yield CounterMetricFamily("aiworker_purged_bytes",
                                  "Bytes of the removed studies' instances",
                                  value=stats.purged_bytes)


def node_registry(db: StateDB, dicom_port: int) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) with the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(db, dicom_port))
    return registry
