"""Prometheus metrics of the server (GET /metrics), in a registry of their own.

Counters and histograms are updated where things happen (the HTTP handlers, the engine thread);
queue depth and queued tokens are read from the scheduler at scrape time, and so are the GPUs' memory
and utilization (through NVML) when the ranks run on CUDA.
"""

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger("tp_embed")

LATENCY_BUCKETS = (.002, .005, .01, .02, .035, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # rank 0's CPU time, resident memory, open files
        self.requests = Counter("tp_embed_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.errors = Counter("tp_embed_errors", "error responses, by status code and error code",
                              ["status", "code"], registry=r)
        self.inputs = Counter("tp_embed_inputs", "inputs embedded", registry=r)
        self.prompt_tokens = Counter("tp_embed_prompt_tokens", "tokens embedded", registry=r)
        self.cancelled = Counter("tp_embed_requests_cancelled",
                                 "admitted requests dropped before their result, by reason "
                                 "(client_disconnected, timeout); their remaining inputs are never computed",
                                 ["reason"], registry=r)
        self.request_latency = Histogram("tp_embed_request_latency_seconds",
                                         "time from receiving an embeddings request to its response",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize_latency = Histogram("tp_embed_tokenize_seconds",
                                          "time to parse, validate and tokenize one request, images fetched and "
                                          "preprocessed included (thread pool)",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("tp_embed_queue_seconds",
                                       "time from admission to the last input's result",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("tp_embed_batch_forward_seconds", "time of one batch's forward pass",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram("tp_embed_batch_requests", "requests with inputs in one batch",
                                        buckets=COUNT_BUCKETS, registry=r)
        self.batch_inputs = Histogram("tp_embed_batch_inputs", "inputs in one batch",
                                      buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("tp_embed_batch_tokens", "tokens in one batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.group_batches = Counter("tp_embed_group_batches", "batches computed, by data-parallel group",
                                     ["group"], registry=r)
        self.group_tokens = Counter("tp_embed_group_tokens", "tokens computed, by data-parallel group",
                                    ["group"], registry=r)
        self.queue_depth = Gauge("tp_embed_queue_depth", "requests with inputs waiting for a batch", registry=r)
        self.requests_in_flight = Gauge("tp_embed_requests_in_flight",
                                        "requests admitted and not yet answered by the engine", registry=r)
        self.queued_tokens = Gauge("tp_embed_queued_tokens",
                                   "tokens admitted and not yet embedded (the --max-queued-tokens budget)",
                                   registry=r)
        self.ready = Gauge("tp_embed_ready", "1 when every rank is up and the model is loaded", registry=r)

    def watch_scheduler(self, scheduler) -> None:
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.requests_in_flight.set_function(lambda: scheduler.num_active)
        self.queued_tokens.set_function(lambda: scheduler.queued_tokens)

    def observe_batch(self, num_requests: int, num_inputs: int, num_tokens: int, seconds: float,
                      group: int = 0) -> None:
        self.group_batches.labels(group=str(group)).inc()
        self.group_tokens.labels(group=str(group)).inc(num_tokens)
        self.batch_requests.observe(num_requests)
        self.batch_inputs.observe(num_inputs)
        self.batch_tokens.observe(num_tokens)
        self.batch_seconds.observe(seconds)

    def watch_gpus(self, num_local_gpus: int) -> None:
        """Export memory and utilization of this node's GPUs 0..num_local_gpus-1 (CUDA numbering)."""
        try:
            self.registry.register(NvmlCollector(num_local_gpus))
        except Exception as e:  # no NVML library, driver too old: serve without GPU metrics
            logger.warning("GPU metrics disabled: NVML unavailable (%s: %s)", type(e).__name__, e)


class NvmlCollector:
    """Reads NVML at every scrape. CUDA device i is matched to its NVML handle by UUID, since NVML numbers
    every GPU of the machine while CUDA numbers only the visible ones."""

    def __init__(self, num_local_gpus: int):
        import pynvml
        import torch
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = []
        for i in range(num_local_gpus):
            uuid = str(torch.cuda.get_device_properties(i).uuid)
            self.handles.append((str(i), pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")))

    def collect(self):
        used = GaugeMetricFamily("tp_embed_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily("tp_embed_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu"])
        util = GaugeMetricFamily("tp_embed_gpu_utilization_ratio",
                                 "fraction of the last sample period a kernel ran (NVML)", labels=["gpu"])
        for gpu, handle in self.handles:
            try:
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            except self.nvml.NVMLError as e:
                logger.warning("NVML read of GPU %s failed: %s", gpu, e)
                continue
            used.add_metric([gpu], memory.used)
            total.add_metric([gpu], memory.total)
            util.add_metric([gpu], rates.gpu / 100.0)
        yield used
        yield total
        yield util
