"""The `proctor` command. Each area registers its own sub-commands; this module only wires them up."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Modules that provide `register(subparsers)`; each sub-command sets `func(args) -> int`.
_COMMAND_MODULES = (
    "proctor.server",           # serve
    "proctor.storage.commands", # init, users, purge
    "proctor.models.commands",  # heads, train-head, classify, import-keras
)


class CommandError(Exception):
    """A command failed for a reason the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proctor", description="Self-hosted screen proctoring server.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"proctor {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
