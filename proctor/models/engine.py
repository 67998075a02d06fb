"""The model engine: frames in, every head's score out, one backbone pass per backbone group per batch.

Heads are grouped by (backbone hash, preprocessing, pooling); each group runs its backbone once for the
whole batch and then all its heads as one stacked matrix product (heads.HeadStack). The head set is an
immutable snapshot swapped by a single reference assignment, so a batch always sees one consistent set
while heads are added or removed. Runtimes: ONNX Runtime on the CPU (fastest there), PyTorch on CUDA
(inference mode, channels_last, pinned memory, fp16 autocast), and PyTorch on the CPU for comparison.

Runners take the decoded frames as a uint8 NHWC batch and do their preprocessing themselves (inside
the ONNX graph on the CPU). On the CPU the engine is built for `workers` concurrent classify() calls,
each running ONNX Runtime on `threads` cores (by default one call per core, each single-threaded):
a model split over 2 threads waits at every layer for the slower thread, and on a server whose decode
threads and event loop share those cores one of them is often late; two single-threaded calls on two
batches never wait for each other.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torchvision

from proctor.models.backbone import (
    Backbone, BackboneError, BackboneLibrary, BackboneSpec, check_frames, feature_dim, frames_to_batch, random_backbone,
    resize_frames, to_input,
)
from proctor.models.heads import Head, HeadError, HeadStack, load_heads, share_backbone_passes
from proctor.models.interface import HeadInfo, Preprocessing, Scores

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
PRECISIONS = ("fp16", "bf16", "fp32")


class EngineError(ValueError):
    """The engine cannot do what was asked (unknown backbone, bad runtime...); the message says why."""


GroupKey = tuple[str, Preprocessing, str]  # (backbone hash, preprocessing, pooling)
# A runner maps a uint8 NHWC batch at its group's input size to pooled features [N, F].
Runner = Callable[[torch.Tensor], torch.Tensor]


class _OnnxRunner:
    """A backbone + pooling as an ONNX Runtime session on the CPU."""

    def __init__(self, backbone: Backbone, preprocessing: Preprocessing, pooling: str, cache_dir: Path | None,
                 threads: int, frames_per_call: int | None = None):
        import onnxruntime as ort

        from proctor.models.onnx_export import INPUT_NAME, export_onnx

        graph = export_onnx(backbone, preprocessing, pooling, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        # ONNX Runtime's worker threads spin between calls by default: on a server that also runs the
        # event loop and the JPEG decode threads on the same few cores, spinning steals their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = str(graph) if isinstance(graph, Path) else graph
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = INPUT_NAME
        self.frames_per_call = frames_per_call

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        # Session.run is thread-safe: concurrent calls (one per inference worker) share the weights.
        array = np.ascontiguousarray(frames.numpy())
        step = self.frames_per_call or len(array)
        if len(array) <= step:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        # Slices small enough that the activations stay in the CPU's cache (Config.cpu_batch).
        return torch.from_numpy(np.concatenate([self.session.run(None, {self.input_name: array[i:i + step]})[0]
                                                for i in range(0, len(array), step)]))


class _TorchRunner:
    """A backbone + pooling as an eager torch module; on CUDA channels_last with autocast."""

    def __init__(self, backbone: Backbone, preprocessing: Preprocessing, pooling: str, device: torch.device,
                 precision: str):
        self.device = device
        self.preprocessing = preprocessing
        self.module = copy.deepcopy(backbone.pooled(pooling)).to(device).eval()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if self.cuda else None

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # uint8 crosses to the device (4x less than float), then converts there.
            batch = to_input(frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float(),
                             self.preprocessing)
            if self.cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self.dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self.dtype):
                    return self.module(batch).float()
            return self.module(batch)


@dataclass(frozen=True, eq=False)
class _Group:
    key: GroupKey
    preprocessing: Preprocessing
    runner: Runner
    stack: HeadStack
    columns: torch.Tensor  # where this group's heads go among all heads


@dataclass(frozen=True, eq=False)
class _State:
    """One consistent head set: what a batch sees from start to end."""

    heads: tuple[Head, ...]
    infos: tuple[HeadInfo, ...]
    groups: tuple[_Group, ...]
    frame_size: tuple[int, int]
    # frame_size, then every other group input size (see Engine.frame_sizes)
    frame_sizes: tuple[tuple[int, int], ...]


def _at_size(frame: np.ndarray | tuple[np.ndarray, ...], size: tuple[int, int]) -> np.ndarray:
    """The picture at `size` (width, height) from a frame given at one or several sizes; else its first."""
    if not isinstance(frame, tuple):
        return frame
    if not frame:
        raise EngineError("a frame given as a tuple of sizes holds no picture")
    width, height = size
    return next((f for f in frame if getattr(f, "shape", ())[:2] == (height, width)), frame[0])


def pick_device(device: str) -> torch.device:
    """Config.device -> torch device: "auto" is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise EngineError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device={device!r}: torch sees no CUDA GPU on this machine")
    if chosen.type not in ("cpu", "cuda"):
        raise EngineError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    return chosen


class Engine:
    """Implements proctor.models.interface.Classifier; `classify` is called from one inference thread."""

    def __init__(self, library: BackboneLibrary, device: str = "auto", runtime: str = "auto",
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None, precision: str = "fp16",
                 workers: int = 1, cpu_batch: int | None = None):
        if runtime not in RUNTIMES:
            raise EngineError(f"runtime={runtime!r}: expected one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise EngineError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.library = library
        self.device = pick_device(device)
        if runtime == "auto":
            runtime = "torch" if self.device.type == "cuda" else "onnx"
        if runtime == "onnx" and self.device.type != "cpu":
            raise EngineError(f"runtime=onnx runs on the CPU only, not on {self.device}")
        self.runtime = runtime
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if workers < 1:
            raise EngineError(f"workers={workers!r}: must be >= 1")
        # Concurrent classify() calls the server may make; more than one only pays on the CPU with ONNX
        # Runtime (eager torch shares one global thread pool, and a GPU runs one batch at a time anyway).
        self.workers = workers if runtime == "onnx" else 1
        # ONNX Runtime threads per call: by default the cores shared out among the workers.
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        # Frames per ONNX Runtime call (None: a whole batch at once); see Config.cpu_batch.
        if cpu_batch is not None and cpu_batch < 1:
            raise EngineError(f"cpu_batch={cpu_batch!r}: must be >= 1")
        self.cpu_batch = cpu_batch if runtime == "onnx" else None
        self._calls_lock = threading.Lock()
        self._runners: dict[GroupKey, Runner] = {}
        self._feature_runners: dict[GroupKey, Runner] = {}  # for features(), kept apart from the head groups
        self._lock = threading.Lock()  # serialises set_heads; classify never waits on it
        self._backbone_calls = 0
        default = library.default.spec.preprocessing
        size = (default.width, default.height)
        self._state = _State((), (), (), size, (size,))
        logger.info("model engine on %s with %s (%d worker(s) x %d thread(s)%s), default backbone %s", self.device,
                    runtime, self.workers, self.threads,
                    f", {self.cpu_batch} frame(s) per call" if self.cpu_batch else "", library.default)

    @classmethod
    def from_config(cls, config: Any, runtime: str = "auto") -> "Engine":
        """The server's engine: Config.backbone_weights, device, inference_workers, cpu_batch; caches under
        <data_dir>/cache."""
        library = BackboneLibrary.from_config(config)
        workers = config.inference_workers or (os.cpu_count() or 1)  # 0: one per core (the CPU only)
        return cls(library, device=config.device, runtime=runtime, cache_dir=Path(config.data_dir) / "cache",
                   workers=workers, cpu_batch=config.cpu_batch)

    @classmethod
    def random(cls, seed: int = 0, width: int = 64, height: int = 36, runtime: str = "torch",
               cache_dir: str | os.PathLike | None = None, padding: str = "torch") -> "Engine":
        """An engine on a seeded random backbone: offline and fast, for tests."""
        preprocessing = Preprocessing(width=width, height=height)
        return cls(BackboneLibrary([random_backbone(seed, preprocessing, padding)]), device="cpu",
                   runtime=runtime, cache_dir=cache_dir)

    # --- Classifier ------------------------------------------------------------------------------------------

    @property
    def frame_size(self) -> tuple[int, int]:
        return self._state.frame_size

    @property
    def frame_sizes(self) -> tuple[tuple[int, int], ...]:
        """Every group's input size (width, height), frame_size first: a caller that decodes a frame at each
        (a tuple of arrays, in this order, given to classify) gives every head the pixels it was trained on,
        instead of a resize of the largest. Read for every frame: worked out when the heads change."""
        return self._state.frame_sizes

    @property
    def heads(self) -> tuple[HeadInfo, ...]:
        return self._state.infos

    @property
    def loaded_heads(self) -> tuple[Head, ...]:
        return self._state.heads

    @property
    def backbone(self) -> BackboneSpec:
        """The default backbone: new heads are trained on it."""
        return self.library.default.spec

    @property
    def backbone_calls(self) -> int:
        """Backbone passes so far: one per group per batch, whatever the number of heads."""
        return self._backbone_calls

    def classify(self, frames: Sequence[np.ndarray | tuple[np.ndarray, ...]]) -> Scores:
        """Score every frame with every head; frames are HxWx3 uint8 RGB, resized when not frame_size.

        A frame may also be a tuple of the same picture at several sizes (see frame_sizes): each group
        then takes the one of its input size, or resizes the first when none fits (the heads changed
        since the frame was decoded).
        """
        state = self._state  # read once: the whole batch uses this head set
        if len(frames) == 0:
            return Scores(state.infos, np.zeros((0, len(state.infos)), np.float32))
        if any(isinstance(frame, tuple) for frame in frames):
            sized = {size: self._to_device(frames_to_batch([_at_size(f, size) for f in frames], size))
                     for size in {(g.preprocessing.width, g.preprocessing.height) for g in state.groups}}
            return self._score(lambda width, height: sized[(width, height)], len(frames), state)
        if not state.groups:
            check_frames(frames)  # bad input is refused the same way with or without heads
            return Scores(state.infos, np.zeros((len(frames), 0), np.float32))
        batch = self._to_device(frames_to_batch(frames, state.frame_size))
        return self._score(lambda width, height: resize_frames(batch, width, height), len(frames), state)

    def classify_jpegs(self, jpegs: Sequence[bytes]) -> Scores:
        """Decode a batch of JPEGs on this engine's device (nvJPEG on CUDA), then score them like classify().

        The CPU then only checks JPEG headers; one corrupt frame fails the whole call (the server then
        decodes that batch on the CPU frame by frame, so only the bad frame fails).
        """
        state = self._state
        if len(jpegs) == 0:
            return Scores(state.infos, np.zeros((0, len(state.infos)), np.float32))
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec, which would add
            # FFmpeg to the install; decode_jpeg is still the batched nvJPEG path of the pinned version.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
        # Each group's input resized once from the decoded picture, not twice through the largest size.
        sizes = {(g.preprocessing.width, g.preprocessing.height) for g in state.groups}
        sized = {(w, h): torch.cat([resize_frames(image.permute(1, 2, 0).unsqueeze(0), w, h) for image in images])
                 for w, h in sizes}
        return self._score(lambda w, h: sized[(w, h)], len(jpegs), state)

    def _score(self, input_for: Callable[[int, int], torch.Tensor], count: int, state: "_State") -> Scores:
        """Every group's heads on `input_for(width, height)`: the batch at that group's input size."""
        if not state.groups:
            return Scores(state.infos, np.zeros((count, 0), np.float32))
        values = torch.empty((count, len(state.infos)), dtype=torch.float32, device=self.device)
        for group in state.groups:
            features = group.runner(input_for(group.preprocessing.width, group.preprocessing.height))
            with self._calls_lock:  # workers may score batches at the same time
                self._backbone_calls += 1
            values[:, group.columns] = group.stack.apply(features.to(self.device))
        out = values.cpu().numpy()
        if len(out) != count:
            raise EngineError(f"the model returned {len(out)} rows for {count} frames")
        return Scores(state.infos, out)

    # --- heads ----------------------------------------------------------------------------------------------

    def set_heads(self, sources: Iterable[Head | Any], strict: bool = False) -> list[str]:
        """Replace the head set atomically; sources are Heads, HeadRecords, head file bytes or paths.

        Blocking (may load a backbone or build its runtime the first time): call it off the event loop.
        A head that is invalid or whose backbone this engine cannot load is refused: with strict,
        nothing changes and EngineError says why; otherwise (the server's case: one bad stored head
        must not stop the others) it is left out, logged, and the returned messages say why.
        """
        with self._lock:
            refused: list[str] = []
            usable: list[Head] = []
            names: set[str] = set()
            for source in sources:
                try:
                    head = load_heads([source])[0]
                except HeadError as exc:
                    refused.append(str(exc))
                    continue
                problem = self._check_backbone(head)
                if head.name in names:
                    problem = f"two heads are named {head.name!r}; the second is left out"
                if problem:
                    refused.append(problem)
                else:
                    usable.append(head)
                    names.add(head.name)
            if refused and strict:
                raise EngineError("; ".join(refused))
            for message in refused:
                logger.error("head refused: %s", message)
            self._state = self._build_state(usable)
            logger.info("heads now: %s", ", ".join(h.name for h in usable) or "none")
            return refused

    def check_head(self, head: Head) -> str | None:
        """Why this engine cannot run `head` (its backbone is unknown here), or None when it can."""
        return self._check_backbone(head)

    def _check_backbone(self, head: Head) -> str | None:
        try:
            backbone = self.library.get(head.backbone_hash)
        except BackboneError as exc:
            return f"head {head.name!r}: its backbone {head.backbone_hash[:12]} cannot be loaded: {exc}"
        if backbone is None:
            return (f"head {head.name!r} was made for backbone {head.backbone_hash[:12]}, which this server does "
                    f"not have (it has {', '.join(h[:12] for h in self.library.known())}); train the head again on "
                    f"this backbone, or import its Keras model here")
        return None

    def _build_state(self, heads: list[Head]) -> _State:
        groups: dict[GroupKey, list[int]] = {}
        stacked = share_backbone_passes(heads)  # avg heads join an avg_max2x2 group of their backbone
        for i, head in enumerate(stacked):
            groups.setdefault(head.group, []).append(i)
        built = []
        for key, indices in groups.items():
            stack = HeadStack.build([stacked[i] for i in indices], self.device)
            columns = torch.tensor(indices, dtype=torch.long, device=self.device)
            built.append(_Group(key, key[1], self._runner(key), stack, columns))
        # Unused runners are dropped from the cache; a batch still running keeps its own reference.
        self._runners = {g.key: g.runner for g in built}
        if built:
            size = (max(g.preprocessing.width for g in built), max(g.preprocessing.height for g in built))
        else:
            default = self.library.default.spec.preprocessing
            size = (default.width, default.height)
        sizes = tuple(dict.fromkeys([size] + [(g.preprocessing.width, g.preprocessing.height) for g in built]))
        return _State(tuple(heads), tuple(h.info() for h in heads), tuple(built), size, sizes)

    def _runner(self, key: GroupKey) -> Runner:
        runner = self._runners.get(key)
        if runner is None:
            backbone = self.library.get(key[0])
            if backbone is None:
                raise EngineError(f"backbone {key[0][:12]} is not available")
            runner = self._make_runner(backbone, key[1], key[2])
        return runner

    def _make_runner(self, backbone: Backbone, preprocessing: Preprocessing, pooling: str) -> Runner:
        if self.runtime == "onnx":
            runner: Runner = _OnnxRunner(backbone, preprocessing, pooling, self.cache_dir, self.threads, self.cpu_batch)
        else:
            runner = _TorchRunner(backbone, preprocessing, pooling, self.device, self.precision)
        # One pass now, so the first students' frames do not pay for lazy allocation and kernel set-up.
        runner(torch.zeros((1, preprocessing.height, preprocessing.width, 3), dtype=torch.uint8))
        return runner

    # --- features for training ---------------------------------------------------------------------------------

    def features(self, frames: Sequence[np.ndarray], spec: BackboneSpec | None = None,
                 batch_size: int = 32) -> np.ndarray:
        """Pooled features [N, F] float32 of the default backbone (or `spec`), with this engine's runtime."""
        spec = spec or self.backbone
        key = (spec.weights_hash, spec.preprocessing, spec.pooling)
        with self._lock:
            runner = self._runners.get(key) or self._feature_runners.get(key)
            if runner is None:
                runner = self._feature_runners[key] = self._runner(key)
        size = (spec.preprocessing.width, spec.preprocessing.height)
        out = []
        for start in range(0, len(frames), batch_size):
            batch = self._to_device(frames_to_batch(frames[start:start + batch_size], size))
            out.append(runner(batch).float().cpu().numpy())
        if not out:
            return np.zeros((0, feature_dim(spec.preprocessing, spec.pooling)), np.float32)
        return np.concatenate(out)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The uint8 batch on the engine's device: through pinned memory, without blocking, on CUDA."""
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)

    def device_memory_bytes(self) -> int | None:
        """GPU memory the engine's tensors hold now (CUDA only; None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))

    def describe(self) -> dict[str, Any]:
        """What runs where, for logs and health pages."""
        state = self._state
        return {"device": str(self.device), "runtime": self.runtime, "workers": self.workers,
                "threads": self.threads, "cpu_batch": self.cpu_batch, "frame_size": list(state.frame_size),
                "backbone": self.backbone.weights_hash, "heads": len(state.heads),
                "groups": [{"backbone": g.key[0][:12], "input": f"{g.preprocessing.width}x{g.preprocessing.height}",
                            "pooling": g.key[2], "heads": len(g.stack.heads)} for g in state.groups]}


__all__ = ["Engine", "EngineError", "PRECISIONS", "RUNTIMES", "pick_device"]
