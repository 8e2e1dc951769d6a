"""The machine's load while a training stage runs, as `system/...` metrics of its MLflow run.

MLflow's own sampler (CPU, memory, disk, network; GPU where NVML finds one), with two things it
lacks for a stage: the samples it holds are sent when the stage ends (it sends only after a whole
interval, so a stage shorter than one would have none), and a failure to send them never fails the
stage.
"""

from __future__ import annotations

import logging

from gptcore.errors import redact

log = logging.getLogger("gptcore.tracking")

INTERVAL_S = 5  # seconds between samples


class SystemMetrics:
    """Sampling into run `run_id` from construction until `stop()`."""

    def __init__(self, run_id: str, tracking_uri: str):
        self.run_id, self.monitor = run_id, None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=INTERVAL_S, tracking_uri=tracking_uri)
        except ImportError as e:  # psutil is a dependency of gptcore; an environment without it still trains
            log.warning("no system metrics for run %s: %s", run_id, e)
            return
        self.monitor.start()

    def stop(self) -> None:
        """End the sampler and send what it holds; idempotent."""
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        monitor.finish()
        try:
            if held := monitor.aggregate_metrics():
                monitor.publish_metrics(held)
                monitor.mlflow_logger.flush()
        except Exception as e:  # the machine's load is not worth a stage: its own metrics and outputs stand
            log.warning("system metrics of run %s not sent: %s: %s", self.run_id, type(e).__name__, redact(str(e)))
