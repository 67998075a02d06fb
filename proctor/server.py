"""The aiohttp application: `create_app(config)` and the `proctor serve` command.

Every long-lived resource (store, write-behind queue, model engine, batcher and its
threads, the hub) is an async generator in app.cleanup_ctx: created at start, torn down
in reverse order at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import hmac
import json
import logging
import os
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Protocol, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proctor import config as config_module
from proctor import protocol
from proctor.appkeys import CLASSIFIER_KEY, CONFIG_KEY, HUB_KEY, METRICS_KEY, STORE_KEY, WRITER_KEY
from proctor.batching import decode
from proctor.batching.batcher import DynamicBatcher
from proctor.config import MAX_REQUEST_BYTES, Config
from proctor.metrics import Metrics
from proctor.models.interface import Classifier
from proctor.sessions import (OUTBOX_LIMIT, Hub, Outbox, StreamContext, StreamSession, alert_message,
                              alert_thumbnail, close_ws)
from proctor.storage.base import InvalidData, NotFound, StoreError, StoreUnavailable, User
from proctor.storage.writer import WriteBehind, WriteQueueClosed, WriteQueueFull
from proctor.training_jobs import training_ctx

logger = logging.getLogger(__name__)


class Authenticator(Protocol):
    """The seam between the WebSocket endpoints and login: proctor.web.auth implements it."""

    async def current_user(self, request: web.Request) -> User | None: ...

    def origin_allowed(self, request: web.Request) -> bool: ...


AUTH_KEY: "web.AppKey[Authenticator]" = web.AppKey("authenticator")
BATCHER_KEY = web.AppKey("batcher", DynamicBatcher)
STREAM_CTX_KEY = web.AppKey("stream_context", StreamContext)
READY_KEY = web.AppKey("ready", dict)
HEADS_LOCK_KEY = web.AppKey("heads_lock", asyncio.Lock)
# How often a node checks the database for exams ended and sessions ended whose notice it may have missed.
RESYNC_S = 30.0


def create_app(config: Config, *, store: Any = None, classifier: Classifier | None = None,
               authenticator: Authenticator | None = None,
               registry: CollectorRegistry | None = None) -> web.Application:
    """Build the application. Tests pass a store, a fake classifier or authenticator; the server builds its own."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[forwarded_middleware, ws_error_middleware])
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = Metrics(registry)
    app[READY_KEY] = {"classifier": False}
    app[HEADS_LOCK_KEY] = asyncio.Lock()
    app[AUTH_KEY] = authenticator if authenticator is not None else _default_authenticator()
    app.cleanup_ctx.append(_store_ctx(store))
    app.cleanup_ctx.append(_writer_ctx)
    app.cleanup_ctx.append(_classifier_ctx(classifier))
    app.cleanup_ctx.append(_pipeline_ctx)
    app.cleanup_ctx.append(_notifications_ctx)
    app.cleanup_ctx.append(training_ctx)
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/ws/exams/{exam_id:\\d+}/stream", stream_handler)
    app.router.add_get("/ws/exams/{exam_id:\\d+}/live", live_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/readyz", readyz_handler)
    # The pages and JSON API register their own routes and middlewares. Imported here, not at the
    # top: proctor.web's modules import this one for the WebSocket helpers.
    from proctor import web as web_app

    web_app.setup(app)
    return app


def _default_authenticator() -> Authenticator:
    from proctor.web import auth

    return auth  # type: ignore[return-value]  # the module's functions implement the protocol


@web.middleware
async def forwarded_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Behind a trusted reverse proxy, see the request as the browser made it (scheme, client address)."""
    proxies = request.app[CONFIG_KEY].trusted_proxies
    if proxies and request.remote in proxies:
        changes: dict[str, Any] = {}
        proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        if proto in ("http", "https"):
            changes["scheme"] = proto
        # The proxy appends the address it saw last; earlier entries are whatever the client claimed.
        forwarded_for = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded_for:
            changes["remote"] = forwarded_for
        if changes:
            request = request.clone(**changes)
    return await handler(request)


@web.middleware
async def ws_error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """A WebSocket handshake the database cannot answer is a 503 the client retries, not a logged traceback."""
    if not request.path.startswith("/ws/"):
        return await handler(request)
    try:
        return await handler(request)
    except StoreUnavailable as exc:
        logger.warning("store unavailable during the WebSocket handshake of %s: %s", request.path, exc)
        raise refuse(web.HTTPServiceUnavailable, "the database is unavailable; try again shortly") from None


# -- resources (cleanup_ctx) -------------------------------------------------------------------

def _store_ctx(given: Any):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if given is not None:
            app[STORE_KEY] = given
            yield
            return
        from proctor.storage import open_store

        store = await open_store(app[CONFIG_KEY].database_url)
        try:
            await store.migrate()
            app[STORE_KEY] = store
            yield
        finally:
            await store.close()
    return ctx


async def _writer_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    writer = WriteBehind(app[STORE_KEY], app[METRICS_KEY], maxsize=config.store_queue_size,
                         max_bytes=config.store_queue_mb * 2**20)
    writer.start()
    app[WRITER_KEY] = writer
    try:
        yield
    finally:
        await writer.close(timeout=10.0)


def _classifier_ctx(given: Classifier | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        classifier = given
        if classifier is None:
            from proctor.models.engine import Engine

            loop = asyncio.get_running_loop()
            # Building the engine may export the backbone to ONNX: minutes at worst, off the loop.
            classifier = await loop.run_in_executor(None, Engine.from_config, app[CONFIG_KEY])
        app[CLASSIFIER_KEY] = classifier
        await reload_heads(app)
        app[READY_KEY]["classifier"] = True
        yield
    return ctx


async def reload_heads(app: web.Application) -> None:
    """Load the store's active heads into the classifier (atomic swap); called at start and on change."""
    classifier = app[CLASSIFIER_KEY]
    set_heads = getattr(classifier, "set_heads", None)
    if set_heads is None:
        return
    # One reload at a time: two notifications close together would otherwise each read the store and the
    # one that read first could be applied last, leaving a stale head set until the next change.
    async with app[HEADS_LOCK_KEY]:
        records = await app[STORE_KEY].list_heads(active_only=True)
        loop = asyncio.get_running_loop()
        # strict=False: a head made for another backbone is left out (and logged), the others still load.
        await loop.run_in_executor(None, functools.partial(set_heads, records, strict=False))
    app[METRICS_KEY].heads_loaded.set(len(classifier.heads))
    logger.info("heads loaded: %s", ", ".join(h.name for h in classifier.heads) or "none")


def decode_threads(config: Config, classifier: Any) -> int:
    """Config.decode_threads, with auto (-1) worked out: 0 (the event loop decodes) when the model runs on a
    CPU of at most 4 cores, whose frames/s it limits; else 2."""
    if config.decode_threads >= 0:
        return config.decode_threads
    device = getattr(classifier, "device", None)
    on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    return 0 if on_cpu and len(os.sched_getaffinity(0)) <= 4 else 2


async def _pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    metrics = app[METRICS_KEY]
    classifier = app[CLASSIFIER_KEY]
    threads = decode_threads(config, classifier)
    # With 0, one thread still decodes what the loop does not (large frames, evidence copies, thumbnails).
    decode_pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
    logger.info("JPEG frames are decoded %s", f"in {threads} thread(s)" if threads else
                "on the event loop (large or progressive ones, evidence copies and thumbnails in a thread)")
    # One thread per batch the engine runs at once (on the CPU one per core, each single-threaded).
    workers = classifier.workers
    infer_pool = ThreadPoolExecutor(workers, thread_name_prefix="inference")

    def decode_on_cpu(jpeg: bytes):
        return decode.decode_rgb(jpeg, classifier.frame_size)

    def rows(scores) -> list:
        return [(scores.heads, scores.values[i]) for i in range(len(scores.values))]

    def infer(frames: list) -> list:
        return rows(classifier.classify(frames))

    def infer_jpegs(jpegs: list) -> list:
        try:
            return rows(classifier.classify_jpegs(jpegs))
        except Exception:
            # A corrupt frame fails nvJPEG's whole batch: decode this batch on the CPU, frame by frame,
            # so only the bad frame fails.
            frames, results = [], []
            for jpeg in jpegs:
                try:
                    frames.append(decode_on_cpu(jpeg))
                    results.append(None)
                except decode.DecodeError as exc:
                    results.append(exc)
            scored = iter(rows(classifier.classify(frames))) if frames else iter(())
            return [next(scored) if result is None else result for result in results]

    if config.decode_device == "gpu":
        if getattr(classifier, "device", None) is None or classifier.device.type != "cuda":
            raise RuntimeError("decode_device=gpu needs the model on a CUDA device; none is in use")
        logger.info("JPEG frames are decoded on %s in batches", classifier.device)
        infer_step = infer_jpegs
    else:
        infer_step = infer  # sessions submit the pixels they decoded for change detection

    batcher = DynamicBatcher(prepare=None, infer=infer_step, decode_executor=decode_pool,
                             infer_executor=infer_pool, max_batch=config.max_batch,
                             max_wait_s=config.max_wait_s, max_queue=config.queue_size,
                             infer_workers=workers, metrics=metrics)
    batcher.start()
    store = app[STORE_KEY]
    writer = app[WRITER_KEY]

    def write(op, what: str = "write", size: int = 0, optional: bool = False) -> bool:
        """Queue a store write (see WriteBehind.submit); False when the queue refused it (logged, counted)."""
        try:
            writer.submit(op, what, size, optional)
        except (WriteQueueFull, WriteQueueClosed):
            return False  # the frame path goes on
        return True

    # The store stamps every notification with its node id; the hub skips its own by that id.
    hub = Hub(metrics, node_id=store.node_id,
              publish=lambda channel, payload: write(lambda: store.publish(channel, payload), channel, optional=True))
    app[BATCHER_KEY] = batcher
    app[HUB_KEY] = hub
    app[STREAM_CTX_KEY] = StreamContext(config=config, metrics=metrics, batcher=batcher,
                                        decode_executor=decode_pool, decode_on_loop=threads == 0,
                                        hub=hub, classifier=classifier,
                                        write=write, store=store)
    housekeeping = asyncio.create_task(_housekeeping(hub, classifier, metrics), name="housekeeping")
    try:
        yield
    finally:
        housekeeping.cancel()
        await asyncio.gather(housekeeping, return_exceptions=True)
        await hub.close_all(protocol.CLOSE_GOING_AWAY, "server shutting down")
        await batcher.close()
        # Joining the threads waits for a batch in the model: not on the event loop.
        loop = asyncio.get_running_loop()
        for pool in (decode_pool, infer_pool):
            await loop.run_in_executor(None, functools.partial(pool.shutdown, wait=True))


async def _close_sockets(app: web.Application) -> None:
    """on_shutdown: close every stream and live view now (1001).

    aiohttp waits for running handlers (up to its 60 s shutdown timeout, then cancels them) before
    cleanup_ctx runs, and a WebSocket handler only ends when its socket does.
    """
    hub = app.get(HUB_KEY)
    if hub is not None:
        await hub.close_all(protocol.CLOSE_GOING_AWAY, "server shutting down")


async def _housekeeping(hub: Hub, classifier: Classifier, metrics: Metrics) -> None:
    """Once a second: mark silent streams stale, and sample the GPU memory the model holds."""
    loop = asyncio.get_running_loop()
    device_memory = getattr(classifier, "device_memory_bytes", None)
    while True:
        await asyncio.sleep(1.0)
        try:
            hub.mark_stale(loop.time())
            used = device_memory() if device_memory is not None else None
            if used is not None:
                metrics.gpu_memory_bytes.set(used)
        except Exception:
            # One bad tick (a CUDA error reading the memory, say) must not end stale detection for good.
            logger.exception("housekeeping failed")


async def _notifications_ctx(app: web.Application) -> AsyncIterator[None]:
    """React to changes made through any node: head set, alerts, presence, exams ending."""
    store = app[STORE_KEY]
    hub = app[HUB_KEY]

    async def on_notification(channel: str, payload: dict[str, Any]) -> None:
        try:
            if channel == "heads":
                await reload_heads(app)
            elif channel in ("exam", "user") and payload.get("resync"):
                await _resync(app, channel)
            elif channel == "exam" and payload.get("state") == "ended":
                await hub.end_exam(int(payload["id"]), protocol.CLOSE_EXAM_ENDED, "the exam has ended")
            elif channel == "user" and payload.get("active") is False:
                await hub.close_user(int(payload["id"]), protocol.CLOSE_ACCOUNT_DEACTIVATED,
                                     "your account was deactivated")
            elif channel == "user" and payload.get("password_reset"):
                # Its session cookies stopped working with the old password; its open sockets end too.
                await hub.close_user(int(payload["id"]), protocol.CLOSE_PASSWORD_RESET,
                                     "your password was reset: log in again")
            elif channel == "user" and payload.get("logged_out"):
                await hub.close_user(int(payload["id"]), protocol.CLOSE_LOGGED_OUT, "you logged out: log in again")
            elif payload.get("node") == hub.node_id:
                return  # our own alert/presence: already fanned out locally
            elif channel == "alert":
                # Each notice runs in a task of its own: the alert's close may come while this reads it.
                with hub.announcing(payload["id"]):
                    await _relay_alert(app, payload)
            elif channel == "alert_closed":
                hub.alert_closed(int(payload["exam_id"]), int(payload["student_id"]), payload["alert_id"],
                                 payload["closed_at"])
            elif channel == "presence":
                user = User(int(payload["student_id"]), payload["username"], payload.get("full_name", ""),
                            "student", True, "", None)  # type: ignore[arg-type]
                hub.set_presence(int(payload["exam_id"]), user, payload["state"], payload.get("displays"),
                                 from_node=payload["node"])
        except Exception:
            logger.exception("handling %s notification %r failed", channel, payload)

    await store.subscribe(on_notification)
    resync = asyncio.create_task(_resync_forever(app), name="resync")
    try:
        yield
    finally:
        resync.cancel()
        await asyncio.gather(resync, return_exceptions=True)
        await store.unsubscribe(on_notification)


async def _resync_forever(app: web.Application) -> None:
    """Every RESYNC_S, act on what the database says about this node's sockets (and send again the presence
    notices a full write queue refused).

    A notice can be lost: a publish that failed after its change was committed, a LISTEN connection that
    was down, a node that missed SQLite's notification table. Without this, students could go on sharing
    their screen into an exam that ended, or a logged-out account keep its sockets, until they reconnect.
    """
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(1.0)
        if loop.time() - last < RESYNC_S:
            continue
        last = loop.time()
        app[HUB_KEY].republish_presence()
        for channel in ("exam", "user"):
            try:
                await _resync(app, channel)
            except StoreError as exc:
                logger.warning("periodic %s resync skipped: %s", channel, exc)
            except Exception:
                logger.exception("periodic %s resync failed", channel)


async def _resync(app: web.Application, channel: str) -> None:
    """After notifications may have been lost: act on what the database says now about the exams
    ("exam") or accounts ("user") this node holds sockets for."""
    store, hub = app[STORE_KEY], app[HUB_KEY]
    if channel == "exam":
        for exam_id in hub.exams_not_ended():
            if (await store.get_exam(exam_id)).state == "ended":
                await hub.end_exam(exam_id, protocol.CLOSE_EXAM_ENDED, "the exam has ended")
    else:
        for user_id in hub.users_with_sockets():
            user = await store.get_user(user_id)
            if not user.active:
                await hub.close_user(user_id, protocol.CLOSE_ACCOUNT_DEACTIVATED, "your account was deactivated")
            else:
                await hub.close_ended_sessions(user)


async def _relay_alert(app: web.Application, payload: dict[str, Any]) -> None:
    store = app[STORE_KEY]
    alert = await store.get_alert(payload["id"])
    user = await store.get_user(alert.student_id)
    thumb = await alert_thumbnail(alert.evidence, app[STREAM_CTX_KEY].decode_executor)
    app[HUB_KEY].alert_opened(alert.exam_id, user, alert_message(alert, user, thumb))


# -- WebSocket endpoints -------------------------------------------------------------------------

def refuse(status: type[web.HTTPException], message: str) -> web.HTTPException:
    """A WebSocket handshake refused with a JSON error (every /ws/ endpoint answers the same way)."""
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def ws_user(request: web.Request) -> User:
    """The logged-in user of a WebSocket handshake whose Origin is allowed; refuses (403/401) otherwise."""
    auth = request.app[AUTH_KEY]
    if not auth.origin_allowed(request):
        raise refuse(web.HTTPForbidden, "WebSocket Origin not allowed")
    user = await auth.current_user(request)
    if user is None:
        raise refuse(web.HTTPUnauthorized, "log in first")
    return user


async def _exam_of(request: web.Request):
    try:
        return await request.app[STORE_KEY].get_exam(int(request.match_info["exam_id"]))
    except (NotFound, InvalidData):  # InvalidData: an id past the database's integers
        raise refuse(web.HTTPNotFound, "no such exam") from None


async def stream_handler(request: web.Request) -> web.StreamResponse:
    """A student's screen stream into one running exam they are on the roster of."""
    user = await ws_user(request)
    exam = await _exam_of(request)
    store = request.app[STORE_KEY]
    if user.role != "student":
        raise refuse(web.HTTPForbidden, "only students stream their screen")
    if not await store.is_on_roster(exam.id, user.id):
        raise refuse(web.HTTPForbidden, "you are not on this exam's roster")
    if exam.state != "running":
        raise refuse(web.HTTPConflict, f"the exam is {exam.state}, not running")
    config = request.app[CONFIG_KEY]
    # Messages up to twice the frame limit are read and refused with an error; beyond that,
    # aiohttp stops reading and closes with 1009 so a 50 MB message never sits in memory.
    ws = web.WebSocketResponse(max_msg_size=2 * config.max_frame_bytes + protocol.HEADER_SIZE,
                               heartbeat=30.0, compress=False)
    await ws.prepare(request)
    session = StreamSession(request.app[STREAM_CTX_KEY], exam, user, ws)
    try:
        with request.app[HUB_KEY].user_socket(user, ws):
            await session.run()
    except Exception:
        logger.exception("stream of %s in exam %d failed", user.username, exam.id)
        await close_ws(ws, protocol.CLOSE_INTERNAL, "internal error")
    return ws


async def live_handler(request: web.Request) -> web.StreamResponse:
    """A teacher's live view of one exam: snapshot, then presence and alerts as they happen."""
    user = await ws_user(request)
    exam = await _exam_of(request)
    if user.role != "admin" and exam.owner_id != user.id:
        raise refuse(web.HTTPForbidden, "this exam belongs to another teacher")
    store = request.app[STORE_KEY]
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    hub = request.app[HUB_KEY]
    outbox: Outbox | None = None
    try:
        roster = await store.list_roster(exam.id)
        # A whole hall's presence can change in one tick (its network drops and every stream goes stale at
        # once): the queue holds a few messages per student (the roster, and those who joined since) before
        # the teacher counts as too slow to read.
        outbox = Outbox(ws, request.app[METRICS_KEY], limit=lambda: OUTBOX_LIMIT + 4 * hub.students_in(exam.id))
        outbox.send(hub.add_teacher(exam.id, roster=roster, outbox=outbox, ended=exam.state == "ended"))
        with hub.user_socket(user, ws):
            async for _ in ws:
                pass  # teachers only listen; incoming messages are ignored
    except StoreError:
        logger.exception("live view of exam %d failed", exam.id)
        await close_ws(ws, protocol.CLOSE_INTERNAL, "database unavailable")
    except Exception:
        # After the handshake a raised error would only drop the connection: close it with a code instead.
        logger.exception("live view of exam %d failed", exam.id)
        await close_ws(ws, protocol.CLOSE_INTERNAL, "internal error")
    finally:
        if outbox is not None:
            hub.remove_teacher(exam.id, outbox)
            await outbox.close()
    return ws


# -- operations endpoints ------------------------------------------------------------------------

async def metrics_handler(request: web.Request) -> web.Response:
    token = request.app[CONFIG_KEY].metrics_token
    if token is not None:
        if not secrets_match(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return web.json_response({"error": "metrics need the bearer token"}, status=401)
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def secrets_match(given: str, expected: str) -> bool:
    """Constant-time comparison of a token from a request with the expected one.

    Header bytes that are not UTF-8 reach us as surrogate characters: they must make a mismatch, not
    a UnicodeEncodeError (a 500 with a traceback for anyone who sends them).
    """
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


async def healthz_handler(request: web.Request) -> web.Response:
    return web.json_response({"status": "up"})


async def readyz_handler(request: web.Request) -> web.Response:
    problems = []
    if not request.app[READY_KEY]["classifier"]:
        problems.append("model not loaded")
    try:
        await asyncio.wait_for(request.app[STORE_KEY].ping(), 2.0)
    except (StoreError, asyncio.TimeoutError, OSError) as exc:
        problems.append(f"store unreachable: {exc or type(exc).__name__}")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready", "heads": [h.name for h in request.app[CLASSIFIER_KEY].heads]})


# -- the serve command ---------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the proctoring server")
    config_module.add_arguments(parser)
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from proctor.cli import CommandError

    try:
        config = config_module.from_sources(args)
    except config_module.ConfigError as exc:
        raise CommandError(str(exc)) from None
    logging.getLogger().setLevel(config.log_level.upper())
    run(config)
    return 0


def run(config: Config, argv: Sequence[str] | None = None) -> None:
    import uvloop

    ssl_context = None
    if config.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    scheme = "https" if ssl_context else "http"
    print(f"Proctor listening on {scheme}://{config.host}:{config.port}/ (log in with the admin account "
          f"`proctor init` printed; Ctrl-C stops)", flush=True)
    web.run_app(serving_app(config), host=config.host, port=config.port, ssl_context=ssl_context,
                loop=uvloop.new_event_loop(), print=None, access_log=None)


def serving_app(config: Config, **resources: Any) -> web.Application:
    """The application as `proctor serve` runs it: `create_app` plus what only a long-running process wants."""
    app = create_app(config, **resources)
    # After cleanup_ctx (on_startup runs it first): everything start-up made is in place.
    app.on_startup.append(_freeze_startup_objects)
    app.on_cleanup.append(_unfreeze)
    return app


async def _freeze_startup_objects(app: web.Application) -> None:
    """Keep what start-up made (torch, ONNX Runtime, the model: some 360,000 objects) out of full GC passes.

    A full collection walks every tracked object with the event loop stopped: 160-180 ms here, and under load
    one comes every few minutes as frame objects outlive the young generations. Frozen objects are skipped:
    such a pass then took 19 ms under load. Collected once first, so no garbage is kept for good.
    """
    gc.collect()
    gc.freeze()


async def _unfreeze(app: web.Application) -> None:
    gc.unfreeze()  # back to normal collection once the app has stopped (matters where a process runs several)
