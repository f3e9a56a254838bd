"""Prometheus metrics, in a registry of the app's own (no global state, no multiprocess directory: nothing is
written to disk). Request counting is a plain ASGI middleware, cheaper than Starlette's BaseHTTPMiddleware."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .25, .5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mlsys_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.latency = Histogram("mlsys_request_latency_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("mlsys_batch_size", "Rows per ONNX Runtime call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.rows = Counter("mlsys_predicted_rows", "Examples predicted", registry=r)
        self.queue_depth = Gauge("mlsys_queue_depth", "Rows waiting for a batch", registry=r)
        self.drift = Gauge("mlsys_drift_psi", "PSI of recent inputs against the training inputs", registry=r)
        self.drift_rows = Gauge("mlsys_drift_window_examples", "Examples in the drift window", registry=r)
        self.drift_alert = Gauge("mlsys_drift_alert", "1 while the PSI is above serve.drift_threshold", registry=r)
        self.ready = Gauge("mlsys_ready", "1 when the model is loaded and warmed up", registry=r)
        # completions (continuous batching)
        self.completions = Counter("mlsys_completions", "Completions ended, by finish reason", ["finish_reason"],
                                   registry=r)
        self.tokens = Counter("mlsys_completion_tokens", "Tokens generated", registry=r)
        self.prefills = Counter("mlsys_prefills", "Prefill calls (each admits one or more waiting completions)",
                                registry=r)
        self.joins = Counter("mlsys_prefills_joining_running_batch", "Prefills whose completions joined a decode "
                             "batch already running (continuous batching)", registry=r)
        self.ttft = Histogram("mlsys_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.decode_rows = Histogram("mlsys_decode_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.waiting = Gauge("mlsys_completions_waiting", "Completions queued for a slot", registry=r)
        self.running = Gauge("mlsys_completions_running", "Completions in the decode batch (slots in use)",
                             registry=r)

    def bind(self, batcher, drift) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(lambda: batcher.queued_rows)
        self.drift.set_function(lambda: drift.score)
        self.drift_rows.set_function(lambda: drift.rows)
        self.drift_alert.set_function(lambda: float(drift.alerting))

    def bind_scheduler(self, scheduler) -> None:
        self.waiting.set_function(lambda: len(scheduler.waiting))
        self.running.set_function(lambda: scheduler.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count every HTTP response by route and status, and time it."""

    def __init__(self, app, metrics: Metrics, routes: set):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"  # bounded label values, whatever clients request
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
