"""Typed keys for the state kept on the aiohttp application (shared by server, sessions and web)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proctor.config import Config
from proctor.metrics import Metrics

if TYPE_CHECKING:  # heavy or circular imports only for the type checker
    from proctor.models.interface import Classifier
    from proctor.sessions import Hub
    from proctor.storage.base import Store
    from proctor.storage.writer import WriteBehind

CONFIG_KEY = web.AppKey("config", Config)
METRICS_KEY = web.AppKey("metrics", Metrics)
STORE_KEY: "web.AppKey[Store]" = web.AppKey("store")
# Writes on the frame path (alerts, session events) go through this bounded queue, never straight to the store.
WRITER_KEY: "web.AppKey[WriteBehind]" = web.AppKey("writer")
CLASSIFIER_KEY: "web.AppKey[Classifier]" = web.AppKey("classifier")
HUB_KEY: "web.AppKey[Hub]" = web.AppKey("hub")
