"""Training heads inside the server: one background job at a time, in a worker thread, progress for the page.

Positives are the stored samples of a label (recorded from a live screen or sent from false-positive
alerts); negatives are the stored samples of every other label, topped up from the bundled screenshot
set (data/screens/<program>/) while there are few of them. The finished head is registered in the store,
which publishes "heads", so every node loads it without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from proctor.appkeys import CLASSIFIER_KEY, CONFIG_KEY, STORE_KEY
from proctor.storage import validate
from proctor.storage.base import Conflict, NotFound, Store, StoreError

logger = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "failed")
MIN_POSITIVES = 10
# Below this many stored negatives, the bundled screenshots of other programs are added.
FEW_NEGATIVES = 50
MIN_NEGATIVES = 2  # train_head needs 2 of each class: every cross-validation fold trains on one of each
# Stored negatives beyond this are subsampled (seeded): features of 2000 frames are plenty for one head.
MAX_NEGATIVES = 2000
DEFAULT_SCREENS_DIR = Path(__file__).resolve().parent.parent / "data" / "screens"
_TRAINING_NICE = 10
_KEEP_FINISHED = 50  # finished jobs kept for GET /api/training/{id}


class JobRefused(Exception):
    """A training job cannot start; `status` is the HTTP status (400 bad request, 409 busy, 503 no model)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Cancelled(Exception):
    """Raised from the progress callback inside the worker thread when the server shuts down."""


@dataclass
class TrainingSettings:
    """Knobs of server-side training; tests set small ones with app[TRAINING_SETTINGS_KEY]."""

    options: Any = None  # proctor.models.training.TrainOptions; None = the defaults of `proctor train-head`
    screens_dir: Path | None = DEFAULT_SCREENS_DIR
    min_positives: int = MIN_POSITIVES


@dataclass
class Job:
    id: str
    label: str
    program: str
    description: str
    actor_id: int
    positives: int
    negatives: int
    state: str = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    replaced: bool = False  # True when the label was an existing head, now retrained
    may_replace: bool = False  # whether the actor may retrain an existing head (see TrainingJobs.start)
    active: bool | None = None  # the registered head's active flag (a retrained head keeps its own)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        return {"id": self.id, "label": self.label, "program": self.program, "state": self.state,
                "progress": {"stage": self.stage, "done": self.done, "total": self.total},
                "positives": self.positives, "negatives": self.negatives, "metrics": self.metrics,
                "error": self.error, "replaced": self.replaced, "active": self.active, "seconds": round(end - self.started, 1)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundled_negatives(screens_dir: Path | None, label: str, want: int) -> list[Path]:
    """Up to `want` screenshots of other programs from screens_dir/<program>/, spread evenly over the programs."""
    if screens_dir is None or not screens_dir.is_dir():
        return []
    from proctor.models.training import IMAGE_SUFFIXES

    folders = [p for p in sorted(screens_dir.iterdir()) if p.is_dir() and p.name != label]
    per_folder = [sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                         and not f.name.startswith(".")) for d in folders]
    picked: list[Path] = []
    # Round-robin over the programs so a small `want` still covers all of them.
    for i in range(max((len(files) for files in per_folder), default=0)):
        for files in per_folder:
            if i < len(files):
                picked.append(files[i])
                if len(picked) >= want:
                    return picked
    return picked


class TrainingJobs:
    """At most one training job runs at a time, in its own worker thread; jobs are kept in memory."""

    def __init__(self, store: Store, backbone: Callable[[], Any], cache_dir: Path | None,
                 settings: TrainingSettings | None = None, served: tuple[int, float] | None = None) -> None:
        self.store = store
        self._backbone = backbone  # returns the Backbone new heads are trained on, or None
        self.cache_dir = cache_dir
        self.settings = settings or TrainingSettings()
        # (client width, JPEG quality) this server's frames come at: new heads are trained on such frames.
        self.served = served
        self.jobs: dict[str, Job] = {}
        self._task: asyncio.Task | None = None
        self._cancel = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="training")
        self._closed = False
        self._start_lock = asyncio.Lock()

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r} on this server node (a job is kept in the memory of "
                           "the node that started it, and forgotten when that node restarts)")
        return job

    @property
    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    async def start(self, label: str, actor_id: int, program: str = "", description: str = "",
                    may_replace: bool = True) -> Job:
        """Check the label and the samples, then start training in the background; JobRefused says why not.

        may_replace: whether the actor may retrain an existing head (it changes every exam allowing it).
        """
        # One start at a time: the busy check and registering the job must not interleave with another's.
        async with self._start_lock:
            return await self._start(label, actor_id, program, description, may_replace)

    async def _start(self, label: str, actor_id: int, program: str, description: str,
                     may_replace: bool) -> Job:
        try:
            validate.head_name(label)
        except Exception as exc:  # InvalidData: the message names the value
            raise JobRefused(400, str(exc)) from None
        if self._closed:
            raise JobRefused(503, "the server is shutting down")
        busy = self.running
        if busy is not None:
            raise JobRefused(409, f"a training job is already running (head {busy.label!r}, job {busy.id}); "
                                  "wait until it is done")
        backbone = self._backbone()
        if backbone is None:
            raise JobRefused(503, "this server's model cannot train heads (no backbone loaded)")
        existing = None
        try:
            existing = await self.store.get_head(label)
        except NotFound:
            pass
        if existing is not None and not may_replace:
            raise JobRefused(403, f"head {label!r} exists and is used by every exam that allows it: only an "
                                  "admin can retrain it; record under a new name, or ask an admin")
        program = (program or "").strip() or (existing.program if existing else label)
        description = (description or "").strip() or (existing.description if existing else "")
        if len(program) > 200 or len(description) > 2000:
            raise JobRefused(400, "program name over 200 or description over 2000 characters")
        counts = await self.store.count_samples()
        need = self.settings.min_positives
        if counts.get(label, 0) < need:
            have = counts.get(label, 0)
            raise JobRefused(400, f"head {label!r} has {have} sample(s); training needs at least {need}: "
                                  f"record {need - have} more of its screen")
        positives = [s.jpeg for s in await self.store.list_samples(label)]
        negatives = await _negatives(self.store, counts, label, set(await _shas(positives)))
        extra: list[Path] = []
        if len(negatives) < FEW_NEGATIVES:
            # A directory walk (and the first import of the training module): off the event loop.
            extra = await asyncio.get_running_loop().run_in_executor(
                None, bundled_negatives, self.settings.screens_dir, label, FEW_NEGATIVES - len(negatives))
        if len(negatives) + len(extra) < MIN_NEGATIVES:
            raise JobRefused(400, f"only {len(negatives) + len(extra)} screenshot(s) of other programs: record "
                                  f"samples of at least one other program first (or put screenshots under "
                                  f"{self.settings.screens_dir}/<program>/)")
        # A job id that cannot be guessed: the job's metrics are only for teachers and admins anyway.
        job = Job(secrets.token_hex(8), label, program, description, actor_id, len(positives),
                  len(negatives) + len(extra), replaced=existing is not None, may_replace=may_replace)
        self._forget_old()
        self.jobs[job.id] = job
        self._cancel.clear()
        self._task = asyncio.create_task(self._run(job, backbone, positives, [*negatives, *extra]),
                                         name=f"training-{label}")
        await self.store.audit(actor_id, "head.training_started", f"head:{label}",
                               {"job": job.id, "positives": job.positives, "negatives": job.negatives,
                                "bundled_negatives": len(extra), "retrain": job.replaced})
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in ("done", "failed")]
        for job in finished[:max(0, len(finished) - _KEEP_FINISHED + 1)]:
            del self.jobs[job.id]

    async def _run(self, job: Job, backbone: Any, positives: list[bytes], negatives: list[Any]) -> None:
        from proctor.models.heads import head_to_record
        from proctor.models.training import TrainingError, TrainOptions, train_head

        options = self.settings.options or TrainOptions()
        if self.served is not None:
            options = dataclasses.replace(options, client_width=self.served[0], client_quality=self.served[1])
        if self.cache_dir is not None:
            options = _with_cache(options, self.cache_dir)

        def progress(stage: str, done: int, total: int) -> None:
            if self._cancel.is_set():
                raise _Cancelled()
            job.stage, job.done, job.total = stage, done, total

        def work():
            _lower_priority()
            return train_head(job.label, positives, negatives, backbone, program=job.program,
                              description=job.description, options=options, progress=progress)

        job.state = job.stage = "running"
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, work)
            job.stage = "registering"
            record = head_to_record(result.head)
            if job.replaced:
                record = await self.store.replace_head(record)
            else:
                try:
                    record = await self.store.add_head(record)
                except Conflict:
                    # Registered while this job trained (another node's job, an upload): replacing it now is
                    # a retrain, with the same rule as starting one.
                    if not job.may_replace:
                        raise TrainingError(
                            f"while this job trained, a head named {job.label!r} was registered elsewhere (another "
                            "node or an upload); it is used by every exam that allows it, so only an admin can "
                            "replace it: record under a new name, or ask an admin to retrain it") from None
                    record = await self.store.replace_head(record)
                    job.replaced = True
            job.metrics, job.active = result.metrics, record.active
            job.state = job.stage = "done"
            logger.info("training job %s: head %s registered", job.id, job.label)
            try:
                await self.store.audit(job.actor_id, "head.retrained" if job.replaced else "head.trained",
                                       f"head:{job.label}", {"job": job.id, "program": job.program,
                                                             "metrics": result.metrics})
            except StoreError:
                # The head is registered: the job succeeded, whatever became of its audit entry.
                logger.exception("training job %s: head %s registered, but its audit entry was not written",
                                 job.id, job.label)
        except asyncio.CancelledError:
            self._cancel.set()
            job.state, job.error = "failed", "the server shut down during training"
            raise
        except TrainingError as exc:
            job.state, job.error = "failed", str(exc)
        except _Cancelled:
            job.state, job.error = "failed", "the server shut down during training"
        except Exception as exc:
            logger.exception("training job %s for head %s failed", job.id, job.label)
            message = str(exc) if exc.__class__.__module__.startswith("proctor.storage") else \
                "internal error; the server log has the details"
            job.state, job.error = "failed", message
        finally:
            job.finished = time.monotonic()
            if job.state == "failed":
                await _audit_quietly(self.store, job.actor_id, "head.training_failed", f"head:{job.label}",
                                     {"job": job.id, "error": job.error})

    async def close(self) -> None:
        """Stop the running job (it stops at its next progress step) and wait for its thread."""
        self._closed = True
        self._cancel.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        # The thread notices the cancel flag within one feature batch; the fit step itself is short.
        await loop.run_in_executor(None, self._pool.shutdown, True)


async def _negatives(store: Store, counts: dict[str, int], label: str, positive_shas: set[str]) -> list[bytes]:
    """Other labels' samples, minus copies of a positive (an alert sent under two labels), at most MAX_NEGATIVES.

    Read one label at a time and subsampled (seeded) to its share, so memory holds one label's JPEGs at most.
    """
    others = sorted(name for name in counts if name != label)
    seen = set(positive_shas)
    out: list[bytes] = []
    for i, name in enumerate(others):
        share = (MAX_NEGATIVES - len(out)) // (len(others) - i)
        fresh = []
        jpegs = [sample.jpeg for sample in await store.list_samples(name)]
        for jpeg, sha in zip(jpegs, await _shas(jpegs)):
            if sha not in seen:
                seen.add(sha)
                fresh.append(jpeg)
        out.extend(random.Random(name).sample(fresh, share) if len(fresh) > share else fresh)
    return out


async def _shas(jpegs: list[bytes]) -> list[str]:
    """SHA-256 of each JPEG, in a thread: a few thousand frames are hundreds of MB to hash."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: [_sha(j) for j in jpegs])


def _lower_priority() -> None:
    """Nice the training thread (threads it starts inherit it): the frames of students come first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _TRAINING_NICE)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        logger.debug("training runs at normal priority: %s", exc)


def _with_cache(options: Any, cache_dir: Path) -> Any:
    return options if options.cache_dir else dataclasses.replace(options, cache_dir=cache_dir)


async def _audit_quietly(store: Store, actor_id: int, action: str, target: str, detail: dict[str, Any]) -> None:
    try:
        await store.audit(actor_id, action, target, detail)
    except Exception:
        logger.exception("could not write the audit entry %s for %s", action, target)


TRAINING_KEY = web.AppKey("training_jobs", TrainingJobs)
TRAINING_SETTINGS_KEY = web.AppKey("training_settings", TrainingSettings)


def _default_backbone(app: web.Application) -> Callable[[], Any]:
    def get() -> Any:
        # Only the real engine has a backbone library; a fake or remote classifier cannot train.
        library = getattr(app[CLASSIFIER_KEY], "library", None)
        return library.default if library is not None else None
    return get


async def training_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx resource: the job runner, closed (job cancelled, thread joined) at shutdown."""
    settings = app.get(TRAINING_SETTINGS_KEY) or TrainingSettings()
    cache = Path(app[CONFIG_KEY].data_dir) / "cache" / "features"
    config = app[CONFIG_KEY]
    jobs = TrainingJobs(app[STORE_KEY], _default_backbone(app), cache, settings,
                        served=(config.client_max_width, config.client_jpeg_quality))
    app[TRAINING_KEY] = jobs
    try:
        yield
    finally:
        await jobs.close()
