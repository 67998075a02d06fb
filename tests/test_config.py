import pytest

from proctor import config
from proctor.config import Config, ConfigError


def test_defaults_are_valid_and_frozen():
    c = Config()
    assert c.database_url == "sqlite:///var/proctor.db" and c.max_wait_s == 0.01
    with pytest.raises(AttributeError):
        c.port = 1  # type: ignore[misc]


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {"PROCTOR_PORT": "9000", "PROCTOR_MAX_BATCH": "16", "PROCTOR_ALLOWED_ORIGINS": "https://a.example"}
    c = config.parse(["--port", "9100"], env)
    assert c.port == 9100  # flag
    assert c.max_batch == 16  # environment
    assert c.allowed_origins == ("https://a.example",)
    assert c.max_wait_ms == 10.0  # default


@pytest.mark.parametrize("argv,named", [
    (["--port", "0"], "port"),
    (["--port", "eighty"], "port"),
    (["--device", "tpu"], "device"),
    (["--database-url", "mysql://x"], "database_url"),
    (["--max-batch", "0"], "max_batch"),
    (["--alert-k", "4", "--alert-n", "3"], "alert_k"),
    (["--client-fps", "0"], "client_fps"),
    (["--tls-cert", "/nonexistent.pem"], "tls_cert/tls_key"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "tls_cert"),
    (["--allowed-origins", "evil.example"], "allowed_origins"),
    (["--trusted-proxies", "proxy.local"], "trusted_proxies"),
    (["--log-level", "LOUD"], "log_level"),
    (["--store-queue-mb", "0"], "store_queue_mb"),
    (["--store-queue-mb", "3", "--max-frame-bytes", "2000000"], "store_queue_mb"),
    (["--inference-workers", "-1"], "inference_workers"),
    (["--decode-threads", "-2"], "decode_threads"),
    (["--decode-threads", "65"], "decode_threads"),
    (["--cpu-batch", "0"], "cpu_batch"),
    (["--login-failures-per-address", "0"], "login_failures_per_address"),
])
def test_bad_values_are_refused_with_their_name(argv, named):
    with pytest.raises(ConfigError, match=f"invalid {named}="):
        config.parse(argv, {})


def test_bad_environment_value_is_named():
    with pytest.raises(ConfigError, match="invalid max_frame_bytes='lots'"):
        config.parse([], {"PROCTOR_MAX_FRAME_BYTES": "lots"})
