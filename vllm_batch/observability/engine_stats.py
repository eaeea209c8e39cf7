"""vLLM's own scheduler stats → ``vllm_batch_engine_*`` metrics, for the loaded model.

vLLM V1 hands every engine step's ``SchedulerStats``/``IterationStats`` to its stat
loggers in our process (the engine core sends them along with its outputs). We pass one
logger of our own to ``AsyncLLM``; it keeps vLLM's text logging off (``--disable-log-stats``
stays) and, being a ``PrometheusStatLogger`` subclass that never calls the parent
constructor, also keeps vLLM from registering its ~60 ``vllm:`` series: each step costs a
few gauge writes. vLLM is imported only when an engine starts.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_batch.observability import metrics


@functools.cache
def stat_logger_class() -> type[Any]:
    """The stat logger class to pass to ``AsyncLLM(stat_loggers=[...])``."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import CachingMetrics

    class BatchServerStatLogger(PrometheusStatLogger):  # type: ignore[misc]
        """Forwards scheduler stats to ``metrics.engine_stats`` under the served model name."""

        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            # No super().__init__: that would register vLLM's own Prometheus series.
            self.model = str(vllm_config.model_config.served_model_name)
            self.engine_indexes = engine_indexes or [0]
            self.prefix_cache = CachingMetrics()

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            preemptions = iteration_stats.num_preempted_reqs if iteration_stats else 0
            if scheduler_stats is None:
                if preemptions:
                    metrics.engine_stats(self.model, preemptions=preemptions)
                return
            prefix = scheduler_stats.prefix_cache_stats
            self.prefix_cache.observe(prefix)
            metrics.engine_stats(
                self.model,
                running=scheduler_stats.num_running_reqs,
                waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
                prefix_queries=prefix.queries,
                prefix_hits=prefix.hits,
                hit_rate=None if self.prefix_cache.empty else self.prefix_cache.hit_rate,
                preemptions=preemptions,
            )

        def log(self) -> None:
            return None

        def log_engine_initialized(self) -> None:
            return None

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            return None

        def record_admission_rejection(self, reason: str) -> None:
            return None

    return BatchServerStatLogger
