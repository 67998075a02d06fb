"""The model engine: frames in, every head's score out, one backbone pass per backbone group per batch.

Heads are grouped by (backbone hash, preprocessing, pooling); each group runs its backbone once for the
whole batch and then all its heads as one stacked matrix product (heads.HeadStack). The head set is an
immutable snapshot swapped by a single reference assignment, so a batch always sees one consistent set
while heads are added or removed. Runtimes: ONNX Runtime on the CPU (fastest there), PyTorch on CUDA
(inference mode, channels_last, pinned memory, fp16 autocast), and PyTorch on the CPU for comparison.
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
    Backbone, BackboneError, BackboneLibrary, BackboneSpec, check_frames, feature_dim, frames_to_tensor, random_backbone,
    resize, to_input,
)
from proctor.models.heads import Head, HeadError, HeadStack, load_heads
from proctor.models.interface import HeadInfo, Preprocessing, Scores

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
PRECISIONS = ("fp16", "bf16", "fp32")


class EngineError(ValueError):
    """The engine cannot do what was asked (unknown backbone, bad runtime...); the message says why."""


GroupKey = tuple[str, Preprocessing, str]  # (backbone hash, preprocessing, pooling)
Runner = Callable[[torch.Tensor], torch.Tensor]


class _OnnxRunner:
    """A backbone + pooling as an ONNX Runtime session on the CPU."""

    def __init__(self, backbone: Backbone, preprocessing: Preprocessing, pooling: str, cache_dir: Path | None,
                 threads: int):
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

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class _TorchRunner:
    """A backbone + pooling as an eager torch module; on CUDA channels_last with autocast."""

    def __init__(self, backbone: Backbone, pooling: str, device: torch.device, precision: str):
        self.device = device
        self.module = copy.deepcopy(backbone.pooled(pooling)).to(device).eval()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if self.cuda else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
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
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None, precision: str = "fp16"):
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
        self.threads = threads or os.cpu_count() or 1
        self._runners: dict[GroupKey, Runner] = {}
        self._feature_runners: dict[GroupKey, Runner] = {}  # for features(), kept apart from the head groups
        self._lock = threading.Lock()  # serialises set_heads; classify never waits on it
        self._backbone_calls = 0
        default = library.default.spec.preprocessing
        self._state = _State((), (), (), (default.width, default.height))
        logger.info("model engine on %s with %s, default backbone %s", self.device, runtime, library.default)

    @classmethod
    def from_config(cls, config: Any, runtime: str = "auto") -> "Engine":
        """The server's engine: Config.backbone_weights, Config.device, caches under <data_dir>/cache."""
        library = BackboneLibrary.from_config(config)
        return cls(library, device=config.device, runtime=runtime, cache_dir=Path(config.data_dir) / "cache")

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

    def classify(self, frames: Sequence[np.ndarray]) -> Scores:
        """Score every frame with every head; frames are HxWx3 uint8 RGB, resized when not frame_size."""
        state = self._state  # read once: the whole batch uses this head set
        if len(frames) == 0:
            return Scores(state.infos, np.zeros((0, len(state.infos)), np.float32))
        if not state.groups:
            check_frames(frames)  # bad input is refused the same way with or without heads
            return Scores(state.infos, np.zeros((len(frames), 0), np.float32))
        batch = frames_to_tensor(frames, state.frame_size, self.device, pin=self.device.type == "cuda")
        return self._score(batch, state)

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
        width, height = state.frame_size
        batch = torch.cat([resize(image.unsqueeze(0).float(), width, height) for image in images])
        return self._score(batch, state)

    def _score(self, batch: torch.Tensor, state: "_State") -> Scores:
        count = batch.shape[0]
        if not state.groups:
            return Scores(state.infos, np.zeros((count, 0), np.float32))
        values = torch.empty((count, len(state.infos)), dtype=torch.float32, device=self.device)
        for group in state.groups:
            features = group.runner(to_input(batch, group.preprocessing))
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
        for i, head in enumerate(heads):
            groups.setdefault(head.group, []).append(i)
        built = []
        for key, indices in groups.items():
            stack = HeadStack.build([heads[i] for i in indices], self.device)
            columns = torch.tensor(indices, dtype=torch.long, device=self.device)
            built.append(_Group(key, key[1], self._runner(key), stack, columns))
        # Unused runners are dropped from the cache; a batch still running keeps its own reference.
        self._runners = {g.key: g.runner for g in built}
        if built:
            size = (max(g.preprocessing.width for g in built), max(g.preprocessing.height for g in built))
        else:
            default = self.library.default.spec.preprocessing
            size = (default.width, default.height)
        return _State(tuple(heads), tuple(h.info() for h in heads), tuple(built), size)

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
            runner: Runner = _OnnxRunner(backbone, preprocessing, pooling, self.cache_dir, self.threads)
        else:
            runner = _TorchRunner(backbone, pooling, self.device, self.precision)
        # One pass now, so the first students' frames do not pay for lazy allocation and kernel set-up.
        runner(torch.zeros((1, 3, preprocessing.height, preprocessing.width), device=self.device))
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
            batch = frames_to_tensor(frames[start:start + batch_size], size, self.device)
            out.append(runner(to_input(batch, spec.preprocessing)).float().cpu().numpy())
        if not out:
            return np.zeros((0, feature_dim(spec.preprocessing, spec.pooling)), np.float32)
        return np.concatenate(out)

    def device_memory_bytes(self) -> int | None:
        """GPU memory the engine's tensors hold now (CUDA only; None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))

    def describe(self) -> dict[str, Any]:
        """What runs where, for logs and health pages."""
        state = self._state
        return {"device": str(self.device), "runtime": self.runtime, "frame_size": list(state.frame_size),
                "backbone": self.backbone.weights_hash, "heads": len(state.heads),
                "groups": [{"backbone": g.key[0][:12], "input": f"{g.preprocessing.width}x{g.preprocessing.height}",
                            "pooling": g.key[2], "heads": len(g.stack.heads)} for g in state.groups]}


__all__ = ["Engine", "EngineError", "PRECISIONS", "RUNTIMES", "pick_device"]
