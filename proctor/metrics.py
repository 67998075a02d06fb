"""Prometheus metrics. The registry is passed in (never the global one) so each app and test has its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

DROP_REASONS = ("oversize", "bad_jpeg", "rate_limited", "overloaded", "replaced")
ALERT_KINDS = ("unrecognised", "forbidden_program")
EVIDENCE_RESULTS = ("requested", "stored", "refused")

# Decode of a 640x360 JPEG at 1/2 DCT scale takes about half a millisecond (1280x720 at 1/4: about one):
# buckets from 0.1 ms.
_DECODE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
# Queue wait and frame latency: milliseconds up to tens of seconds under overload.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
# A password check is ~0.1-0.2 s of argon2; at exam start checks queue one behind the other for seconds.
_LOGIN_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the server exports, registered on the registry given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total and process_resident_memory_bytes: the load generator reads them.
        ProcessCollector(registry=r)
        self.frames_received = Counter("proctor_frames_received", "Frames received from students.",
                                       registry=r)
        self.frames_dropped = Counter("proctor_frames_dropped", "Frames not classified, by reason.",
                                      ["reason"], registry=r)
        self.frames_unchanged = Counter("proctor_frames_unchanged",
                                        "Frames whose screen had not changed: the last verdict was reused.",
                                        registry=r)
        self.frames_classified = Counter("proctor_frames_classified", "Frames run through the model.",
                                         registry=r)
        self.decode_seconds = Histogram("proctor_decode_seconds",
                                        "JPEG decode time per frame received (with its change-detection thumbnail).",
                                        buckets=_DECODE_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("proctor_queue_wait_seconds",
                                            "Time a frame waited in the batcher queue.",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("proctor_batch_size", "Frames per model batch.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("proctor_inference_seconds",
                                           "Backbone + heads time per batch.",
                                           buckets=_INFERENCE_BUCKETS, registry=r)
        self.frame_latency_seconds = Histogram("proctor_frame_latency_seconds",
                                               "Frame received to verdict sent.",
                                               buckets=_LATENCY_BUCKETS, registry=r)
        self.password_check_seconds = Histogram(
            "proctor_password_check_seconds",
            "Login password checks, waiting included: they run one at a time, behind the streams.",
            buckets=_LOGIN_BUCKETS, registry=r)
        self.queue_depth = Gauge("proctor_queue_depth", "Frames waiting in the batcher queue.", registry=r)
        self.active_streams = Gauge("proctor_active_streams", "Student WebSocket streams open.", registry=r)
        self.active_exams = Gauge("proctor_active_exams", "Exams with at least one open stream.",
                                  registry=r)
        self.heads_loaded = Gauge("proctor_heads_loaded", "Heads loaded in the engine.", registry=r)
        self.store_write_queue_depth = Gauge("proctor_store_write_queue_depth",
                                             "Writes waiting in the store's write-behind queue.",
                                             registry=r)
        self.gpu_memory_bytes = Gauge("proctor_gpu_memory_bytes",
                                      "GPU memory allocated by the engine (CUDA only).", registry=r)
        self.alerts = Counter("proctor_alerts", "Alert episodes opened, by kind.", ["kind"], registry=r)
        self.evidence_copies = Counter("proctor_evidence_copies",
                                       "Full-size copies of alert frames: asked of student pages, stored, refused.",
                                       ["result"], registry=r)
        self.websocket_errors = Counter("proctor_websocket_errors",
                                        "Error messages and close codes sent on WebSockets, by code.",
                                        ["code"], registry=r)
        self.store_errors = Counter("proctor_store_errors", "Failed store operations (retried or not).",
                                    registry=r)
        self.store_writes_refused = Counter("proctor_store_writes_refused",
                                            "Writes refused because the store's write-behind queue was full.",
                                            registry=r)
        # Make the labelled series visible at 0 from the start, so dashboards and alerts see them.
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        for kind in ALERT_KINDS:
            self.alerts.labels(kind)
        for result in EVIDENCE_RESULTS:
            self.evidence_copies.labels(result)
