import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from proctor.batching import decode

from fakes import many_scan_jpeg


def jpeg(width=1280, height=720, seed=0, quality=80):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    pixels = np.ascontiguousarray(np.kron(base, np.ones((40, 40, 1), dtype=np.uint8))[:height, :width])
    return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB")


def test_read_size_from_header():
    assert decode.read_size(jpeg(640, 360)) == (640, 360)


def test_decode_scales_straight_to_model_size():
    pixels = decode.decode_rgb(jpeg(1280, 720), (320, 180))
    assert pixels.shape == (180, 320, 3) and pixels.dtype == np.uint8


def test_decode_resizes_odd_sizes_exactly():
    assert decode.decode_rgb(jpeg(1366, 768), (320, 180)).shape == (180, 320, 3)
    assert decode.decode_rgb(jpeg(200, 100), (320, 180)).shape == (180, 320, 3)


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"0" * 100])
def test_non_jpeg_is_refused_clearly(data):
    with pytest.raises(decode.DecodeError, match="not a JPEG"):
        decode.read_size(data)


def test_truncated_jpeg_fails_with_decode_error():
    data = jpeg()
    with pytest.raises(decode.DecodeError):
        decode.decode_rgb(data[: len(data) // 3], (320, 180))


def test_corrupt_header_fails_with_decode_error():
    data = bytearray(jpeg())
    data[2:40] = b"\x00" * 38
    with pytest.raises(decode.DecodeError):
        decode.read_size(bytes(data))


def test_decompression_bomb_refused_from_header_alone():
    # A 20000x20000 JPEG of one colour is small on the wire but 1.2 GB decoded.
    bomb = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8), colorspace="RGB")
    # Patch the SOF0 frame size to 20000x20000 without touching the (tiny) scan.
    data = bytearray(bomb)
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big")
    with pytest.raises(decode.TooManyPixels, match="20000x20000"):
        decode.check_size(bytes(data), max_pixels=3840 * 2160)


def test_progressive_jpeg_with_too_many_scans_is_refused_from_its_markers():
    flood = many_scan_jpeg(640, 360)  # 2,647 scans: a valid picture, decoded at ~100x a frame's cost
    assert simplejpeg.decode_jpeg(flood, colorspace="RGB").shape == (360, 640, 3)
    with pytest.raises(decode.DecodeError, match="2647 scans"):
        decode.read_size(flood)
    with pytest.raises(decode.DecodeError, match="scans"):
        decode.check_size(memoryview(flood), max_pixels=3840 * 2160)
    # An ordinary progressive JPEG (libjpeg's script: 10 scans) still passes and decodes.
    buffer = io.BytesIO()
    Image.new("RGB", (640, 360), (30, 90, 200)).save(buffer, "JPEG", progressive=True)
    assert buffer.getvalue().count(b"\xff\xda") == 10
    assert decode.read_size(buffer.getvalue()) == (640, 360)
    assert decode.decode_rgb(buffer.getvalue(), (320, 180)).shape == (180, 320, 3)


def test_thumbnail_sees_real_changes_and_ignores_recompression():
    a = decode.thumbnail(jpeg(seed=1, quality=80))
    same_screen = decode.thumbnail(jpeg(seed=1, quality=60))
    other_screen = decode.thumbnail(jpeg(seed=2))
    assert a.shape == (18, 32)
    assert decode.thumbnail_distance(a, same_screen) < 2.0
    assert decode.thumbnail_distance(a, other_screen) > 20.0


def test_one_decode_gives_the_model_pixels_and_the_same_thumbnail():
    for size in ((1280, 720), (1366, 768)):
        frames = [jpeg(*size, seed=s) for s in (1, 2)]
        for data in frames:
            pixels, thumb = decode.decode_with_thumbnail(data, (320, 180))
            np.testing.assert_array_equal(pixels, decode.decode_rgb(data, (320, 180)))
            # At the page's 1280 px width both ways average the same pixels; at other widths they sample
            # the blocks of this synthetic screen a little differently (real screenshots: 1.0 at most).
            limit = 0.01 if size == (1280, 720) else 5.0
            assert thumb.shape == (18, 32) and decode.thumbnail_distance(thumb, decode.thumbnail(data)) < limit
        a, b = (decode.decode_with_thumbnail(data, (320, 180))[1] for data in frames)
        assert decode.thumbnail_distance(a, b) > 20.0


@pytest.mark.parametrize("size", [(320, 180), (640, 360), (96, 54), (330, 190)])
def test_thumbnail_of_is_the_grey_block_mean_pil_makes(size):
    """The numpy block means (exact multiples of 32x18) and PIL's path (other sizes, strided arrays) agree."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for array in (pixels, pixels[:, ::-1]):  # a reversed view is not contiguous: PIL's path takes it
        reference = Image.fromarray(np.ascontiguousarray(array)).convert("L").resize(decode.THUMB_SIZE, Image.BOX)
        thumb = decode.thumbnail_of(array)
        assert thumb.dtype == np.float32 and thumb.shape == (18, 32)
        assert np.abs(thumb - np.asarray(reference, np.float32)).max() <= 1.0
        assert np.array_equal(thumb, np.rint(thumb))


def test_thumbnail_of_a_white_frame_too_tall_for_uint16_sums_is_white():
    pixels = np.full((18 * 260, 32, 3), 255, np.uint8)  # blocks of 260 rows: 260 x 255 is over 65,535
    assert (decode.thumbnail_of(pixels) == 255).all()


def test_evidence_thumbnail_is_a_small_jpeg():
    small = decode.evidence_thumbnail(jpeg(1920, 1080))
    assert decode.read_size(small) == (320, 180)


@pytest.mark.parametrize("data", [b"hello world", b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_evidence_thumbnail_of_a_corrupt_jpeg_is_a_decode_error(data):
    # The session and the cross-node relay catch DecodeError: anything else would kill the alert's task.
    with pytest.raises(decode.DecodeError, match="corrupt JPEG"):
        decode.evidence_thumbnail(data)


def test_served_frame_is_what_the_server_decodes_from_the_page_s_jpeg():
    rng = np.random.default_rng(3)
    screen = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    screen[:, :960] = (20, 200, 40)
    served = decode.served_frame(screen, (320, 180), client_width=640, quality=0.7)
    assert served.shape == (180, 320, 3) and served.dtype == np.uint8
    # The left half stays the flat green the page sent, the right half the noise averaged to grey.
    assert np.abs(served[:, :150].astype(int) - (20, 200, 40)).max() < 20
    assert 100 < served[:, 170:].mean() < 155
    # A screen no wider than the client width is not scaled before encoding.
    small = decode.served_frame(screen[:360, :640], (320, 180), client_width=1280, quality=0.7)
    assert small.shape == (180, 320, 3)


def test_page_jpeg_has_the_browsers_chroma_subsampling():
    # Chromium's canvas.toBlob("image/jpeg") writes 4:2:0; frames standing for a page's must decode like them.
    screen = np.random.default_rng(4).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(decode.page_jpeg(screen, 640, 0.7))
    assert (width, height, colorspace, subsampling) == (640, 360, "YCbCr", "420")
    # Kept as is when narrower than the client width.
    assert simplejpeg.decode_jpeg_header(decode.page_jpeg(screen[:360, :640], 1280, 0.7))[:2] == (360, 640)


DATA = Path(__file__).resolve().parents[1] / "data"


def test_full_size_evidence_of_real_screens_matches_their_frames():
    """The evidence check (sessions.EVIDENCE_MATCH) must accept an honest copy: a page's 640-wide frame and the
    1920-wide copy of the same screen, both at the page's JPEG quality, judged by the server's two thumbnails."""
    from PIL import Image

    from proctor.sessions import EVIDENCE_MATCH

    shots = sorted(DATA.glob("screens*/*/*.jpg"))[::4]
    assert len(shots) > 80
    distances = []
    for shot in shots:
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        _, frame_thumb = decode.decode_with_thumbnail(decode.page_jpeg(pixels, 640, 0.7), (320, 180))
        copy_thumb = decode.thumbnail(decode.page_jpeg(pixels, 1920, 0.7))
        distances.append(decode.thumbnail_distance(frame_thumb, copy_thumb))
    assert max(distances) < EVIDENCE_MATCH, max(distances)
