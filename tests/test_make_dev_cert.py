"""scripts/make-dev-cert: a self-signed pair that Python's ssl accepts, names included, key kept private."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make-dev-cert"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_makes_a_loadable_pair_with_the_names_asked_for(tmp_path):
    out = tmp_path / "tls"
    result = subprocess.run([str(SCRIPT), str(out), "proctor.lan", "192.168.1.20"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cert, key = out / "cert.pem", out / "key.pem"
    assert key.stat().st_mode & 0o077 == 0
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)  # raises when the pair does not match
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True,
                          text=True, check=True).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:proctor.lan", "IP Address:192.168.1.20"):
        assert name in text
