"""One server node for the cross-node test: the real app on a shared database, a small seeded engine.

    python tests/node_main.py PORT DATABASE_URL DATA_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402

from fakes import HeaderAuthenticator  # noqa: E402
from proctor.config import Config  # noqa: E402
from proctor.models.engine import Engine  # noqa: E402
from proctor.server import create_app  # noqa: E402

# Same seed as the test's engine: every node and the test share one backbone hash.
ENGINE_SEED = 3


def main() -> None:
    port, database_url, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = Config(port=port, database_url=database_url, data_dir=data_dir, client_fps=30.0, max_wait_ms=5.0)
    engine = Engine.random(seed=ENGINE_SEED, width=64, height=36, runtime="torch")
    app = create_app(config, classifier=engine, authenticator=HeaderAuthenticator())
    web.run_app(app, host="127.0.0.1", port=port, loop=uvloop.new_event_loop(), print=None)


if __name__ == "__main__":
    main()
