"""Run logs: ``metrics.jsonl`` written per logged step (:mod:`.log`) and its curves as PNG (:mod:`.report`)."""

from medrwr.train.metrics.log import METRIC_ALIASES, MetricsLogger, read_metrics

__all__ = ["METRIC_ALIASES", "MetricsLogger", "read_metrics"]
