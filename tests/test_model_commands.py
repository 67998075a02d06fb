"""`proctor classify`, `import-keras` and `heads add|list|deactivate`, against an in-memory fake store.

The fake implements only the Store methods these commands use (migrate, close, add_head, list_heads,
set_head_active), with the real store's errors.
"""

from __future__ import annotations

import asyncio

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from proctor import cli
from proctor.models import backbone as bb
from proctor.models import commands
from proctor.models.heads import make_head, write_head_file
from proctor.models.interface import Preprocessing
from proctor.storage.base import Conflict, HeadRecord, NotFound
from keras_reference import flatten_dense_top, keras_weights, write_h5


class FakeStore:
    def __init__(self) -> None:
        self.heads: dict[str, HeadRecord] = {}
        self.closed = 0

    async def migrate(self) -> list[int]:
        return []

    async def close(self) -> None:
        self.closed += 1

    async def add_head(self, head: HeadRecord) -> HeadRecord:
        if head.name in self.heads:
            raise Conflict(f"a head named {head.name!r} already exists")
        self.heads[head.name] = dataclasses.replace(head, id=len(self.heads) + 1)
        return self.heads[head.name]

    async def list_heads(self, active_only: bool = False) -> list[HeadRecord]:
        return [h for _, h in sorted(self.heads.items()) if h.active or not active_only]

    async def set_head_active(self, name: str, active: bool) -> None:
        if name not in self.heads:
            raise NotFound(f"no head named {name!r}")
        self.heads[name] = dataclasses.replace(self.heads[name], active=active)


@pytest.fixture
def store(monkeypatch):
    fake = FakeStore()

    async def open_fake(url):
        return fake

    monkeypatch.setattr(commands, "_open_store", open_fake)
    return fake


@pytest.fixture(scope="module")
def backbone():
    return bb.random_backbone(seed=0, preprocessing=Preprocessing(width=64, height=36))


@pytest.fixture
def env(tmp_path, backbone, monkeypatch):
    """A data dir and a small backbone file configured through the environment, as a user would."""
    weights = backbone.save(tmp_path / "weights.pt")
    for key in list(__import__("os").environ):
        if key.startswith("PROCTOR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PROCTOR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PROCTOR_BACKBONE_WEIGHTS", str(weights))
    monkeypatch.setenv("PROCTOR_DEVICE", "cpu")
    return tmp_path


def _head_file(path, spec, name, bias, program=None):
    head = make_head(name, program or name.title(), "logistic",
                     {"weight": np.zeros((1, 1280)), "bias": [bias]}, spec, threshold=0.6)
    return write_head_file(head, path / f"{name}.safetensors")


def _image(path, colour=(10, 200, 30)):
    Image.new("RGB", (128, 72), colour).save(path)
    return path


def test_heads_add_list_deactivate(env, store, backbone, capsys):
    word = _head_file(env, backbone.spec, "word", 2.0)
    assert cli.main(["heads", "add", str(word)]) == 0
    assert "added head 'word'" in capsys.readouterr().out
    assert store.heads["word"].active and store.heads["word"].backbone_hash == backbone.weights_hash

    assert cli.main(["heads", "add", str(word)]) == 2
    assert "a head named 'word' already exists" in capsys.readouterr().err

    assert cli.main(["heads", "list"]) == 0
    out = capsys.readouterr().out
    assert "word" in out and "yes" in out and backbone.weights_hash[:12] in out
    assert cli.main(["heads", "deactivate", "word"]) == 0
    assert not store.heads["word"].active
    assert cli.main(["heads", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["active"] is False
    assert cli.main(["heads", "deactivate", "nope"]) == 2
    assert "no head named 'nope'" in capsys.readouterr().err
    assert store.closed >= 5


def test_heads_add_refuses_bad_and_foreign_heads(env, store, backbone, capsys):
    foreign = _head_file(env, bb.BackboneSpec("ef" * 32, backbone.spec.preprocessing), "foreign", 0.0)
    assert cli.main(["heads", "add", str(foreign)]) == 2
    assert "was made for backbone efefefefefef, which this node does not have" in capsys.readouterr().err
    junk = env / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert cli.main(["heads", "add", str(junk)]) == 2
    assert "junk.safetensors: not a safetensors file" in capsys.readouterr().err
    assert store.heads == {}


def test_classify_with_head_files_and_verdicts(env, store, backbone, capsys):
    word = _head_file(env, backbone.spec, "word", 3.0)  # always fires
    game = _head_file(env, backbone.spec, "game", -3.0)  # never fires
    images = [_image(env / "a.png"), _image(env / "b.jpg", (0, 0, 0))]
    argv = ["classify", "--heads", str(word), "--heads", str(game), "--json", *map(str, images)]
    assert cli.main(argv + ["--allowed", "word"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    assert lines[0]["scores"]["word"] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-5)
    assert lines[0]["verdict"] == {"ok": True, "program": "Word", "reason": None}

    assert cli.main(argv + ["--allowed", "game"]) == 0
    verdicts = [json.loads(line)["verdict"] for line in capsys.readouterr().out.splitlines()]
    assert verdicts[0] == {"ok": False, "program": "Word", "reason": "forbidden_program"}

    assert cli.main(["classify", "--heads", str(word), "--heads", str(game), str(env)]) == 0  # a directory of images
    out = capsys.readouterr().out
    assert "a.png" in out and "b.jpg" in out and "fires" in out and "verdict" not in out


def test_classify_uses_the_stores_active_heads(env, store, backbone, capsys):
    assert cli.main(["heads", "add", str(_head_file(env, backbone.spec, "word", 3.0))]) == 0
    assert cli.main(["classify", "--json", str(_image(env / "a.png"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert list(json.loads(lines[-1])["scores"]) == ["word"]


@pytest.mark.parametrize("problem", ["missing", "not_image", "unknown_allowed", "no_heads"])
def test_classify_errors_are_named(env, store, backbone, capsys, problem):
    word = str(_head_file(env, backbone.spec, "word", 3.0))
    image = str(_image(env / "a.png"))
    bad = env / "notes.png"
    bad.write_text("not a picture")
    argv, message = {
        "missing": (["--heads", word, str(env / "gone.png")], "gone.png: no such file"),
        "not_image": (["--heads", word, str(bad)], "notes.png: not an image"),
        "unknown_allowed": (["--heads", word, "--allowed", "word,excel", image], "--allowed names unknown heads: excel"),
        "no_heads": ([image], "no heads to classify with"),
    }[problem]
    assert cli.main(["classify", *argv]) == 2
    assert message in capsys.readouterr().err


def test_import_keras_then_add_and_classify(env, store, capsys):
    rng = np.random.default_rng(0)
    dense = {"kernel": (rng.standard_normal((2 * 3 * 1280, 2)) * 0.01).astype(np.float32),
             "bias": np.zeros(2, np.float32)}
    model = write_h5(env / "word_model.h5", keras_weights(seed=1), version=2, height=40, width=72,
                     top=flatten_dense_top(2, "softmax"), top_weights={"dense": dense})
    assert cli.main(["import-keras", str(model), "--out", str(env / "out"), "--program", "Word"]) == 0
    out = capsys.readouterr().out
    assert "260 backbone tensors converted" in out and "keras_softmax" in out
    head_file = env / "out" / "word_model.safetensors"
    assert head_file.is_file() and (env / "out" / "word_model.backbone.pt").is_file()
    assert len(list((env / "var" / "backbones").glob("*.pt"))) == 1
    # The imported head's backbone is installed on this node, so the head can be added and used.
    assert cli.main(["heads", "add", str(head_file)]) == 0
    assert store.heads["word_model"].program == "Word" and store.heads["word_model"].threshold == 0.95
    assert cli.main(["classify", "--json", str(_image(env / "a.png"))]) == 0
    assert "word_model" in json.loads(capsys.readouterr().out.splitlines()[-1])["scores"]


def test_import_keras_errors_are_named(env, capsys):
    text = env / "model.h5"
    text.write_text("nope")
    assert cli.main(["import-keras", str(text)]) == 2
    assert "model.h5: not an HDF5" in capsys.readouterr().err
    assert cli.main(["import-keras", str(text), "--threshold", "2"]) == 2
    assert "--threshold 2.0: must be between 0 and 1" in capsys.readouterr().err


def test_heads_commands_against_the_real_sqlite_store(env, backbone, capsys, monkeypatch):
    url = f"sqlite:///{env}/proctor.db"
    monkeypatch.setenv("PROCTOR_DATABASE_URL", url)
    # Before: heads add/list created and migrated any database named, so a mistyped --database-url
    # reported success into a new empty file (and migrated a shared PostgreSQL database).
    assert cli.main(["heads", "list"]) == 2
    assert "run `proctor init` first" in capsys.readouterr().err
    assert not (env / "proctor.db").exists()

    async def init() -> None:  # what `proctor init` does, without its admin account
        from proctor.storage import open_store

        store = await open_store(url)
        await store.migrate()
        await store.close()

    asyncio.run(init())
    word = _head_file(env, backbone.spec, "word", 2.0)
    assert cli.main(["heads", "add", str(word), "--inactive"]) == 0
    assert cli.main(["heads", "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(h["name"], h["active"], h["backbone_hash"]) for h in listed] == [("word", False, backbone.weights_hash)]
    assert cli.main(["heads", "deactivate", "word"]) == 0
    assert cli.main(["heads", "add", str(word)]) == 2
    assert "already exists" in capsys.readouterr().err
