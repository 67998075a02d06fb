"""Test stand-ins for the model and for login, so server tests run fast and exactly."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import simplejpeg

from proctor.models.interface import HeadInfo, Scores

# Each fake head "recognises" screens dominated by one colour channel.
FAKE_HEADS = (
    HeadInfo("editor", "Code editor", 0.5),   # green screens
    HeadInfo("chat", "Chat web app", 0.5),    # red screens
    HeadInfo("terminal", "Terminal", 0.5),    # blue screens
)


class FakeClassifier:
    """Scores each head by the share of its colour channel; counts backbone calls and batch sizes."""

    def __init__(self, heads=FAKE_HEADS, frame_size=(320, 180), delay_s: float = 0.0):
        self._heads = tuple(heads)
        self._frame_size = frame_size
        self.delay_s = delay_s
        self.backbone_calls = 0
        self.batch_sizes: list[int] = []
        self.workers = 1
        self._lock = threading.Lock()

    @property
    def frame_size(self):
        return self._frame_size

    @property
    def heads(self):
        return self._heads

    def set_heads(self, records, strict: bool = True) -> None:
        """Records from the store are ignored: the fake keeps its colour heads."""

    def classify(self, frames):
        import time

        with self._lock:
            self.backbone_calls += 1
            self.batch_sizes.append(len(frames))
        if self.delay_s:
            time.sleep(self.delay_s)
        values = np.zeros((len(frames), len(self._heads)), np.float32)
        for i, frame in enumerate(frames):
            assert frame.shape == (self._frame_size[1], self._frame_size[0], 3)
            means = frame.reshape(-1, 3).mean(axis=0)
            share = means / max(means.sum(), 1.0)
            # editor=green(1), chat=red(0), terminal=blue(2)
            for j, channel in enumerate((1, 0, 2)[: len(self._heads)]):
                values[i, j] = share[channel] * 1.5 if share[channel] > 0.5 else share[channel] * 0.5
        return Scores(self._heads, np.clip(values, 0, 1))


async def add_fake_heads(store, heads=FAKE_HEADS) -> None:
    """Register the fake heads in a store, so exams can allow them (their weights are never used)."""
    from safetensors.numpy import save

    from proctor.storage.base import HeadRecord, utcnow

    blob = save({"weight": np.zeros((1, 4), np.float32), "bias": np.zeros((1,), np.float32)})
    for head in heads:
        await store.add_head(HeadRecord(name=head.name, program=head.program, description="fake",
                                        threshold=head.threshold, backbone_hash="fake", metrics={},
                                        active=True, weights=blob, created_at=utcnow()))


def screen(colour: str, width: int = 1280, height: int = 720, seed: int = 0) -> bytes:
    """A JPEG 'screen' dominated by one colour, with some texture so it compresses like a real one."""
    rng = np.random.default_rng(seed)
    channel = {"red": 0, "green": 1, "blue": 2}[colour]
    pixels = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    pixels[:, :, channel] = rng.integers(180, 255, (height, width), dtype=np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=70, colorspace="RGB")


class HeaderAuthenticator:
    """Login stand-in: the user id comes from an X-Test-User header; Origin must be the server's own."""

    def __init__(self, store=None):
        self.store = store

    async def current_user(self, request):
        from proctor.appkeys import STORE_KEY

        user_id = request.headers.get("X-Test-User")
        if user_id is None:
            return None
        return await (self.store or request.app[STORE_KEY]).get_user(int(user_id))

    def origin_allowed(self, request):
        return request.headers.get("Origin") == f"{request.scheme}://{request.host}"


async def raw_http_status(client, request: bytes) -> int:
    """Send raw HTTP/1.1 bytes to a test server (headers an HTTP library would refuse to send); the status."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


def many_scan_jpeg(width: int, height: int, levels: int = 13) -> bytes:
    """A valid progressive JPEG (grey picture, 4:4:4) split into as many scans as the format allows.

    One DC scan, then for each component and each of the 63 AC coefficients a first scan at bit `levels`
    and a refinement scan per lower bit: 3 x 63 x (levels + 1) + 1 scans, each a single run of empty
    blocks, so the file stays small (about 33 kB at 640x360 with 2,647 scans) while libjpeg-turbo passes
    over every block once per scan.
    """
    import struct

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    def packed(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)
        return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))

    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    assert blocks < 1 << 15, "one end-of-band run per scan covers at most 32767 blocks"
    r = blocks.bit_length() - 1  # the EOB-run symbol's size class: runs of 2**r .. 2**(r+1)-1 blocks
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + b"\x01" * 64)
    out += segment(0xC2, struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3)))
    out += segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC: one code, "difference 0"
    out += segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + bytes([r << 4]))  # AC: one code, an EOB run
    out += segment(0xDA, bytes([3, 1, 0, 2, 0, 3, 0, 0, 0, 0])) + packed("0" * blocks * 3)
    empty = packed("0" + format(blocks - (1 << r), f"0{r}b"))
    passes = [(0, levels)] + [(bit, bit - 1) for bit in range(levels, 0, -1)]
    for component in (1, 2, 3):
        for k in range(1, 64):
            for ah, al in passes:
                out += segment(0xDA, bytes([1, component, 0, k, k, (ah << 4) | al])) + empty
    return out + b"\xff\xd9"
