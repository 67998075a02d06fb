"""Heads: small classifiers on backbone features, their file format, and the stacked form the engine runs.

A head file is a safetensors file; its metadata key "proctor" holds JSON: name, program, description,
kind, backbone_hash, preprocessing, pooling, threshold, metrics, created. Tensors by kind:

- "logistic":      weight [1, F], bias [1]                  score = sigmoid(w . f + b)
- "mlp":           hidden.weight [K, F], hidden.bias [K],   score = sigmoid(out . relu(hidden f) + b)
                   out.weight [1, K], out.bias [1]
- "keras_softmax": weight [2, F], bias [2]                  score = softmax(W f + b)[0] (imported Dense(2))

F is backbone.feature_dim(preprocessing, pooling). All heads of one backbone group are stacked into ONE
weight matrix (`HeadStack`), so every head's score for every frame comes from one matrix product.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from proctor.models.backbone import (
    BackboneError, BackboneSpec, feature_dim, preprocessing_from_dict, preprocessing_to_dict,
)
from proctor.models.interface import HeadInfo, Preprocessing
from proctor.storage.base import HeadRecord, utcnow

HEAD_FORMAT = "proctor-head"
HEAD_VERSION = 1
KINDS = ("logistic", "mlp", "keras_softmax")
_METADATA_KEY = "proctor"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_HEAD_FILE_BYTES = 64 * 1024 * 1024


class HeadError(ValueError):
    """A head file or head description is invalid; the message names the head or file."""


def _expected_shapes(kind: str, features: int, hidden: int | None) -> dict[str, tuple[int, ...]]:
    if kind == "logistic":
        return {"weight": (1, features), "bias": (1,)}
    if kind == "keras_softmax":
        return {"weight": (2, features), "bias": (2,)}
    if kind == "mlp":
        return {"hidden.weight": (hidden or 0, features), "hidden.bias": (hidden or 0,),
                "out.weight": (1, hidden or 0), "out.bias": (1,)}
    raise HeadError(f"unknown head kind {kind!r}: expected one of {', '.join(KINDS)}")


@dataclass(frozen=True, eq=False)
class Head:
    """One head: metadata plus float32 tensors (see the module docstring for names and shapes)."""

    name: str
    program: str
    kind: str
    backbone_hash: str
    preprocessing: Preprocessing
    pooling: str
    threshold: float
    tensors: Mapping[str, np.ndarray]
    description: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        where = f"head {self.name!r}"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise HeadError(f"invalid head name {self.name!r}: 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(self.program, str) or not self.program.strip():
            raise HeadError(f"{where}: program must be a non-empty string")
        if not isinstance(self.backbone_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", self.backbone_hash):
            raise HeadError(f"{where}: backbone_hash must be 64 hex digits, got {self.backbone_hash!r}")
        if not (isinstance(self.threshold, (int, float)) and 0.0 < float(self.threshold) < 1.0):
            raise HeadError(f"{where}: threshold must be in (0, 1), got {self.threshold!r}")
        try:
            features = feature_dim(self.preprocessing, self.pooling)
        except BackboneError as exc:
            raise HeadError(f"{where}: {exc}") from None
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in self.tensors.items()}
        hidden = tensors["hidden.weight"].shape[0] if "hidden.weight" in tensors else None
        expected = _expected_shapes(self.kind, features, hidden)
        if set(tensors) != set(expected):
            raise HeadError(f"{where}: a {self.kind} head needs tensors {sorted(expected)}, got {sorted(tensors)}")
        for key, shape in expected.items():
            if tensors[key].shape != shape:
                raise HeadError(f"{where}: tensor {key} has shape {tensors[key].shape}, expected {shape} "
                                f"(features {features} for {self.preprocessing.width}x"
                                f"{self.preprocessing.height} {self.pooling})")
            if not np.all(np.isfinite(tensors[key])):
                raise HeadError(f"{where}: tensor {key} has NaN or infinite values")
        if self.kind == "mlp" and not hidden:
            raise HeadError(f"{where}: an mlp head needs at least one hidden unit")
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "metrics", dict(self.metrics))
        if not self.created:
            object.__setattr__(self, "created", utcnow().isoformat(timespec="seconds"))
        try:
            created = dt.datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise HeadError(f"{where}: created must be an ISO date and time, got {self.created!r}") from None
        if created.tzinfo is None:  # a naive time in a file is taken as UTC, as the store keeps times
            object.__setattr__(self, "created", created.replace(tzinfo=dt.timezone.utc).isoformat())

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.preprocessing, self.pooling)

    @property
    def group(self) -> tuple[str, Preprocessing, str]:
        """Heads with the same group key share one backbone pass."""
        return (self.backbone_hash, self.preprocessing, self.pooling)

    def info(self) -> HeadInfo:
        return HeadInfo(name=self.name, program=self.program, threshold=self.threshold,
                        description=self.description,
                        metadata={"kind": self.kind, "backbone_hash": self.backbone_hash,
                                  "pooling": self.pooling, "metrics": dict(self.metrics), "created": self.created,
                                  "input": f"{self.preprocessing.width}x{self.preprocessing.height}"})

    def metadata(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "version": HEAD_VERSION, "name": self.name, "program": self.program,
                "description": self.description, "kind": self.kind, "backbone_hash": self.backbone_hash,
                "preprocessing": preprocessing_to_dict(self.preprocessing), "pooling": self.pooling,
                "threshold": self.threshold, "metrics": dict(self.metrics), "created": self.created}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save(dict(self.tensors), metadata={_METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    def replace(self, **changes: Any) -> "Head":
        return dataclasses.replace(self, **changes)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """This head alone on features [N, F] -> scores [N]; the reference the stacked form must match."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise HeadError(f"head {self.name!r}: features of shape {features.shape}, expected [N, "
                            f"{self.feature_dim}] ({self.pooling} pooling)")
        return HeadStack.build([self]).apply(torch.from_numpy(features))[:, 0].numpy()


def make_head(name: str, program: str, kind: str, tensors: Mapping[str, Any], backbone: BackboneSpec,
              threshold: float = 0.5, description: str = "", metrics: Mapping[str, Any] | None = None,
              preprocessing: Preprocessing | None = None, pooling: str | None = None) -> Head:
    """A head for `backbone`, using its preprocessing and pooling unless given."""
    return Head(name=name, program=program, kind=kind, backbone_hash=backbone.weights_hash,
                preprocessing=preprocessing or backbone.preprocessing, pooling=pooling or backbone.pooling,
                threshold=threshold, tensors=dict(tensors), description=description, metrics=dict(metrics or {}))


def read_head_file(source: str | os.PathLike | bytes) -> Head:
    """Parse and validate a head file given as a path or as its bytes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), "head file"
    else:
        where = str(source)
        try:
            size = os.path.getsize(source)
            if size > MAX_HEAD_FILE_BYTES:
                raise HeadError(f"{where}: {size} bytes, more than a head file may hold ({MAX_HEAD_FILE_BYTES})")
            data = Path(source).read_bytes()
        except OSError as exc:
            raise HeadError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(data) < 8:
        raise HeadError(f"{where}: not a safetensors file (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8:
        raise HeadError(f"{where}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = load(data)
    except (SafetensorError, ValueError, RecursionError) as exc:
        raise HeadError(f"{where}: not a safetensors file ({exc})") from None
    raw = (header.get("__metadata__") or {}).get(_METADATA_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise HeadError(f"{where}: safetensors file without proctor head metadata")
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError, RecursionError) as exc:
        raise HeadError(f"{where}: head metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise HeadError(f"{where}: metadata is not a {HEAD_FORMAT} description")
    if meta.get("version") != HEAD_VERSION:
        raise HeadError(f"{where}: head format version {meta.get('version')!r} is not supported "
                        f"(this proctor reads version {HEAD_VERSION})")
    missing = [k for k in ("name", "program", "kind", "backbone_hash", "preprocessing", "pooling", "threshold")
               if k not in meta]
    if missing:
        raise HeadError(f"{where}: head metadata lacks {', '.join(missing)}")
    try:
        preprocessing = preprocessing_from_dict(meta["preprocessing"])
        return Head(name=meta["name"], program=meta["program"], kind=meta["kind"],
                    backbone_hash=meta["backbone_hash"], preprocessing=preprocessing, pooling=meta["pooling"],
                    threshold=meta["threshold"], tensors=tensors, description=str(meta.get("description", "")),
                    metrics=meta.get("metrics") or {}, created=str(meta.get("created", "")))
    except (HeadError, BackboneError) as exc:
        raise HeadError(f"{where}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # fields of the wrong type, e.g. "metrics": 5
        raise HeadError(f"{where}: invalid head metadata ({exc})") from None


def write_head_file(head: Head, path: str | os.PathLike) -> Path:
    """Write a head file atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(head.to_bytes())
    os.replace(tmp, path)
    return path


def head_to_record(head: Head, active: bool = True) -> HeadRecord:
    """The store's record for a head; `weights` are the head file's bytes."""
    return HeadRecord(name=head.name, program=head.program, description=head.description,
                      threshold=head.threshold, backbone_hash=head.backbone_hash, metrics=dict(head.metrics),
                      active=active, weights=head.to_bytes(),
                      created_at=dt.datetime.fromisoformat(head.created))


def head_from_record(record: HeadRecord) -> Head:
    """The head a stored record holds; the record's name, program, description and threshold win.

    Those columns are what an admin can edit in the store, so they override the file's copies.
    """
    try:
        head = read_head_file(record.weights)
    except HeadError as exc:
        raise HeadError(f"stored head {record.name!r}: {exc}") from None
    if head.backbone_hash != record.backbone_hash:
        raise HeadError(f"stored head {record.name!r}: record says backbone {record.backbone_hash[:12]}, "
                        f"its weights say {head.backbone_hash[:12]}")
    return head.replace(name=record.name, program=record.program, description=record.description,
                        threshold=record.threshold)


def load_heads(sources: Sequence[Head | HeadRecord | bytes | str | os.PathLike]) -> list[Head]:
    """Heads from any mix of Head objects, store records, head file bytes and paths; names must be unique."""
    heads: list[Head] = []
    for source in sources:
        if isinstance(source, Head):
            heads.append(source)
        elif isinstance(source, HeadRecord):
            heads.append(head_from_record(source))
        else:
            heads.append(read_head_file(source))
    seen: set[str] = set()
    for head in heads:
        if head.name in seen:
            raise HeadError(f"two heads are named {head.name!r}")
        seen.add(head.name)
    return heads


def share_backbone_passes(heads: Sequence[Head]) -> list[Head]:
    """The heads, with "avg" heads widened to "avg_max2x2" where one of their backbone and input uses that pooling.

    avg_max2x2 features begin with the global average, so an avg head with zero weights on the grid
    maxima scores exactly as before; it then joins the avg_max2x2 group and both run ONE backbone pass.
    """
    wide = {(h.backbone_hash, h.preprocessing) for h in heads if h.pooling == "avg_max2x2"}
    out = []
    for head in heads:
        if head.pooling != "avg" or (head.backbone_hash, head.preprocessing) not in wide:
            out.append(head)
            continue
        extra = feature_dim(head.preprocessing, "avg_max2x2") - head.feature_dim
        tensors = dict(head.tensors)
        key = "hidden.weight" if head.kind == "mlp" else "weight"
        tensors[key] = np.pad(tensors[key], ((0, 0), (0, extra)))
        out.append(head.replace(pooling="avg_max2x2", tensors=tensors))
    return out


# --- stacking -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadStack:
    """All heads of one backbone group as one matrix: Z = f @ W.T + b, then per-kind finishing.

    Columns of Z: first one logit per linear head (logistic; keras_softmax as the logit difference
    z0 - z1, since softmax(z)[0] = sigmoid(z0 - z1)), then the MLP heads' hidden units padded to the
    largest hidden size, so their second layers run as one batched product. `order` maps the
    output columns back to the heads' order. Immutable: adding a head builds a new stack.
    """

    heads: tuple[Head, ...]
    weight: torch.Tensor  # [L + M * K, F]
    bias: torch.Tensor  # [L + M * K]
    out_weight: torch.Tensor  # [M, K]
    out_bias: torch.Tensor  # [M]
    linear: int  # L
    order: torch.Tensor  # output column of head i = computed column order[i]

    @classmethod
    def build(cls, heads: Sequence[Head], device: torch.device | str = "cpu") -> "HeadStack":
        if not heads:
            raise HeadError("a head stack needs at least one head")
        keys = {h.group for h in heads}
        if len(keys) != 1:
            raise HeadError("heads of different backbone groups cannot share a stack")
        features = heads[0].feature_dim
        linear = [h for h in heads if h.kind != "mlp"]
        mlp = [h for h in heads if h.kind == "mlp"]
        hidden = max((h.tensors["hidden.weight"].shape[0] for h in mlp), default=0)
        weight = np.zeros((len(linear) + len(mlp) * hidden, features), np.float32)
        bias = np.zeros(weight.shape[0], np.float32)
        for i, h in enumerate(linear):
            w, b = h.tensors["weight"], h.tensors["bias"]
            weight[i], bias[i] = (w[0], b[0]) if h.kind == "logistic" else (w[0] - w[1], b[0] - b[1])
        out_weight = np.zeros((len(mlp), hidden), np.float32)
        out_bias = np.zeros(len(mlp), np.float32)
        for j, h in enumerate(mlp):
            k = h.tensors["hidden.weight"].shape[0]
            start = len(linear) + j * hidden
            # Padding rows stay zero: relu(0) = 0 and a zero output weight, so they add nothing.
            weight[start:start + k] = h.tensors["hidden.weight"]
            bias[start:start + k] = h.tensors["hidden.bias"]
            out_weight[j, :k] = h.tensors["out.weight"][0]
            out_bias[j] = h.tensors["out.bias"][0]
        computed = linear + mlp
        position = {id(h): i for i, h in enumerate(computed)}
        order = torch.tensor([position[id(h)] for h in heads], dtype=torch.long)

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        return cls(tuple(heads), put(weight), put(bias), put(out_weight), put(out_bias), len(linear),
                   order.to(device))

    @property
    def hidden(self) -> int:
        return self.out_weight.shape[1]

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Features [N, F] -> scores [N, H] in [0, 1], columns in the heads' order."""
        features = features.to(self.weight.dtype)
        z = torch.addmm(self.bias, features, self.weight.t())
        linear = z[:, :self.linear]
        if self.out_weight.shape[0]:
            hidden = torch.relu(z[:, self.linear:]).view(z.shape[0], self.out_weight.shape[0], self.hidden)
            mlp = torch.einsum("nmk,mk->nm", hidden, self.out_weight) + self.out_bias
            z = torch.cat([linear, mlp], dim=1)
        else:
            z = linear
        return torch.sigmoid(z).index_select(1, self.order)


__all__ = [
    "HEAD_FORMAT", "Head", "HeadError", "HeadStack", "KINDS", "head_from_record", "head_to_record", "load_heads",
    "make_head", "read_head_file", "share_backbone_passes", "write_head_file",
]
