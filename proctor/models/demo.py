"""The demo heads shipped with the package: one per program of the captured screenshot set (see README)."""

from __future__ import annotations

import logging
from pathlib import Path

from proctor.models.heads import head_to_record, read_head_file

logger = logging.getLogger(__name__)

DEMO_HEADS_DIR = Path(__file__).with_name("demo_heads")


def demo_head_files() -> list[Path]:
    return sorted(DEMO_HEADS_DIR.glob("*.safetensors"))


async def register_demo_heads(store) -> list[str]:
    """Add every demo head to `store` when it has no heads yet; returns the names added."""
    if await store.list_heads():
        return []
    added = []
    for path in demo_head_files():
        head = read_head_file(path)
        await store.add_head(head_to_record(head))
        added.append(head.name)
    if added:
        logger.info("added the demo heads %s", ", ".join(added))
    return added
