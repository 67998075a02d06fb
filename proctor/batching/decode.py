"""JPEG decoding with libjpeg-turbo (simplejpeg): header checks, DCT-scaled decode, change-detection thumbnails.

All functions are blocking and thread-safe: the server runs them in its decode threads, or a small frame's
decode on the event loop (sessions.LOOP_DECODE_MAX_BYTES).
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

# Change detection compares 32x18 grey thumbnails: big enough to see a window open or a page
# scroll, small enough that cursor blinks and clock ticks vanish in the average.
THUMB_SIZE = (32, 18)


class DecodeError(ValueError):
    """The bytes are not a JPEG we can decode (corrupt, truncated, another format)."""


class TooManyPixels(ValueError):
    """The JPEG header announces more pixels than allowed (decompression bomb guard)."""


# Scans a JPEG may have. A progressive JPEG can legally have thousands, each a pass over every block:
# a 44 kB 1920x1080 file of 2,647 empty scans took 680 ms to decode here (a frame takes under 1 ms), so a
# few students could keep the decode threads busy for the whole hall (libjpeg-turbo's advisory on this
# is why it has TJPARAM_SCANLIMIT, which simplejpeg does not set). Encoders write 1 (baseline, what
# browsers' canvases make) to about 10 (libjpeg's progressive default).
MAX_SCANS = 64


def read_size(jpeg: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from the JPEG header alone, without decoding pixels; refuses too many scans."""
    if len(jpeg) < 4 or bytes(jpeg[:2]) != b"\xff\xd8":
        raise DecodeError("not a JPEG image (missing start-of-image marker)")
    _check_scans(jpeg if isinstance(jpeg, bytes) else bytes(jpeg))
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except (ValueError, RuntimeError) as exc:
        raise DecodeError(f"corrupt JPEG header: {exc}") from None
    if width <= 0 or height <= 0:
        raise DecodeError(f"JPEG header has an empty size {width}x{height}")
    return width, height


def is_progressive(jpeg: bytes) -> bool:
    """Whether the JPEG is progressive (SOF2, or SOF10 with arithmetic coding): decoding one costs several passes."""
    header = jpeg[:jpeg.find(b"\xff\xda")]
    return b"\xff\xc2" in header or b"\xff\xca" in header


def _check_scans(jpeg: bytes) -> None:
    """Refuse a progressive JPEG of more than MAX_SCANS scans (runs on the event loop for every frame).

    Only progressive JPEGs (SOF2, or SOF10 with arithmetic coding) can repeat passes over the blocks;
    a sequential one, what browsers send, is passed after looking at its header alone (~1 us). A
    progressive one has its start-of-scan markers counted: inside entropy-coded data 0xFF is always
    followed by 0x00 or a restart marker, so every FF DA is one. (Counting them in every frame
    would cost 45 us each with cold caches.) An FF C2 inside a header table only costs the count.
    """
    if not is_progressive(jpeg):
        return
    data = np.frombuffer(jpeg, np.uint8)
    scans = int(np.count_nonzero((data[:-1] == 0xFF) & (data[1:] == 0xDA)))
    if scans > MAX_SCANS:
        raise DecodeError(f"JPEG with {scans} scans (at most {MAX_SCANS}): progressive images with that many "
                          f"scans cost hundreds of times a normal decode")


def check_size(jpeg: bytes | memoryview, max_pixels: int) -> tuple[int, int]:
    """Header check before any decode: refuse images whose pixel count would blow up memory."""
    width, height = read_size(jpeg)
    if width * height > max_pixels:
        raise TooManyPixels(f"image of {width}x{height} = {width * height} pixels is over the "
                            f"limit of {max_pixels}")
    return width, height


def decode_rgb(jpeg: bytes | memoryview, size: tuple[int, int]) -> np.ndarray:
    """Decode to an RGB uint8 array of exactly `size` (width, height).

    libjpeg-turbo scales in the DCT domain to the smallest 1/8 step that still covers `size`
    (a 1280x720 frame decodes at 1/4 straight to 320x180), which skips most of the IDCT work;
    a cheap resize covers what is left.
    """
    width, height = size
    try:
        pixels = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                        min_width=width, min_height=height)
    except (ValueError, RuntimeError) as exc:
        raise DecodeError(f"corrupt JPEG data: {exc}") from None
    if pixels.shape[1] != width or pixels.shape[0] != height:
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return pixels


# Browsers encode a canvas as JPEG with 4:2:0 chroma subsampling (checked: Chromium's canvas.toBlob; Firefox's
# encoder keeps libjpeg's default, also 4:2:0). Frames made to stand for a page's (training, benchmarks) must
# have it too: a 4:4:4 frame carries twice the colour data, decodes about a third slower and gives other pixels.
PAGE_SUBSAMPLING = "420"
# The student page scales the screen down on a canvas with high-quality smoothing (stream.js smoothContext).
# Of PIL's filters, Hamming comes closest to what Chromium draws (benchmarks/browser_frames.py): mean difference
# 0.2-0.8 grey levels for captured screens 960-1280 wide (and upscaled to 1920) drawn 640 wide, against 0.9-1.9
# for bilinear, which training used before.
PAGE_RESAMPLING = Image.Resampling.HAMMING


def page_jpeg(pixels: np.ndarray, client_width: int, quality: float) -> bytes:
    """A screen's JPEG as the student page sends it: scaled to at most `client_width`, encoded at `quality` (0.1..1)."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.width > client_width:
        image = image.resize((client_width, max(1, round(image.height * client_width / image.width))),
                             PAGE_RESAMPLING)
    return simplejpeg.encode_jpeg(np.ascontiguousarray(np.asarray(image)), quality=round(quality * 100),
                                  colorspace="RGB", colorsubsampling=PAGE_SUBSAMPLING)


def served_frame(pixels: np.ndarray, size: tuple[int, int], client_width: int, quality: float) -> np.ndarray:
    """The model's input for a screen, made as the live path makes it, for training and benchmarks.

    The page's JPEG (`page_jpeg`), decoded by DCT scaling to `size` as the server decodes it. Heads
    trained and judged on pixels made another way (a full decode and a resize) see other pixels than
    they get in an exam.
    """
    return decode_rgb(page_jpeg(pixels, client_width, quality), size)


def thumbnail(jpeg: bytes | memoryview) -> np.ndarray:
    """A 32x18 grey float32 thumbnail for change detection, decoded at up to 1/8 scale.

    For frames that are decoded anyway, `decode_with_thumbnail` makes the same thumbnail from the
    decoded pixels instead of decoding the JPEG a second time.
    """
    width, height = THUMB_SIZE
    try:
        grey = simplejpeg.decode_jpeg(jpeg, colorspace="GRAY", fastdct=True, fastupsample=True,
                                      min_width=width * 2, min_height=height * 2)
    except (ValueError, RuntimeError) as exc:
        raise DecodeError(f"corrupt JPEG data: {exc}") from None
    small = Image.fromarray(grey[:, :, 0]).resize(THUMB_SIZE, Image.BOX)
    return np.asarray(small, dtype=np.float32)


# ITU-R 601-2 luma, the weights of PIL's convert("L") that `thumbnail` gets from libjpeg's greyscale decode.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def thumbnail_of(pixels: np.ndarray) -> np.ndarray:
    """The change-detection thumbnail (as `thumbnail` makes it, within a grey level) of decoded RGB pixels."""
    height, width = pixels.shape[:2]
    thumb_width, thumb_height = THUMB_SIZE
    block_height, block_width = height // thumb_height, width // thumb_width
    if (width % thumb_width or height % thumb_height or not pixels.flags.c_contiguous
            or block_height * 255 > np.iinfo(np.uint16).max):
        image = Image.fromarray(pixels).convert("L").resize(THUMB_SIZE, Image.BOX)
        return np.asarray(image, dtype=np.float32)
    # The model's 320x180 is an exact multiple: block means in numpy cost 25 us where PIL's copy into its
    # own image, reduce and convert cost 85 (this runs for every decoded frame, on the event loop). First
    # the rows of each block band are summed in uint16, then one product with the luma weights repeated per
    # pixel sums each block's columns and makes it grey, rounded to whole grey levels as PIL's are.
    bands = np.add.reduce(pixels.reshape(thumb_height, block_height, width * 3), axis=1, dtype=np.uint16)
    weights = np.tile(_LUMA, block_width) / np.float32(block_width * block_height)
    grey = bands.reshape(thumb_height, thumb_width, block_width * 3).astype(np.float32) @ weights
    return np.rint(grey, out=grey)


def decode_with_thumbnail(jpeg: bytes | memoryview, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB pixels of exactly `size`, change-detection thumbnail) from one decode of the JPEG.

    Huffman decoding the whole file is most of a decode's cost whatever the scale, so decoding once
    for the model and deriving the thumbnail from those pixels costs a changed frame about a third less
    than a 1/8-scale thumbnail decode followed by the model's decode.
    """
    pixels = decode_rgb(jpeg, size)
    return pixels, thumbnail_of(pixels)


def thumbnail_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute grey-level difference (0..255) between two thumbnails."""
    # sum / size: np.mean's Python-level wrapper costs more than the arithmetic on 576 values (runs per frame
    # on the event loop).
    return float(np.abs(a - b).sum()) / a.size


def evidence_thumbnail(jpeg: bytes | memoryview, width: int = 320, quality: int = 70) -> bytes:
    """A small JPEG of the frame for the teacher's live alert list."""
    height = max(1, round(width * 9 / 16))
    try:
        pixels = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                        min_width=width, min_height=height)
    except (ValueError, RuntimeError) as exc:
        raise DecodeError(f"corrupt JPEG data: {exc}") from None
    return thumbnail_jpeg(pixels, width, quality)


def thumbnail_jpeg(pixels: np.ndarray, width: int = 320, quality: int = 70) -> bytes:
    """The alert-list JPEG from RGB pixels already decoded (at most `width` wide, aspect kept)."""
    if pixels.shape[1] > width:
        scale = width / pixels.shape[1]
        pixels = np.asarray(Image.fromarray(pixels).resize(
            (width, max(1, round(pixels.shape[0] * scale))), Image.BILINEAR))
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB")
