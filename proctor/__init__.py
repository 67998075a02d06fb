"""Proctor: self-hosted screen proctoring with batched CNN heads on a shared MobileNetV2 backbone."""

__version__ = "0.1.0"
