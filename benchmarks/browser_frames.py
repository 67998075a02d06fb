"""Do the demo heads judge a real browser's frames as they judge the frames they were trained and measured on?

Training and benchmarks/heads.py make a student's frame in Python (decode.page_jpeg: PIL's filtered
downscale to the client width, libjpeg-turbo 4:2:0 at the page's quality). A student's page makes it in the
browser: the canvas of proctor/web/static/stream.js (its own scaledSize and smoothContext, loaded into the
page) and canvas.toBlob("image/jpeg"). This script makes every held-out screenshot's frame both ways, with
Debian's Chromium (headless), decodes both as the server does, and compares: pixel difference of the model
inputs, score difference per head, head decisions that differ, and each head's balanced accuracy on the
browser's frames; and, for every 6th screenshot, how far the canvas's drawing (before JPEG) is from each of
PIL's resampling filters (what decode.PAGE_RESAMPLING was chosen by). `--canvas-smoothing low` draws as the
page did before it asked for high-quality smoothing.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/browser_frames.py [--canvas-smoothing high|low]
Prints JSON and writes benchmarks/results/browser_frames-SMOOTHING.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.heads import head_scores  # noqa: E402
from benchmarks.machine import describe as describe_machine, write_result  # noqa: E402
from proctor.batching import decode  # noqa: E402
from proctor.config import Config  # noqa: E402
from proctor.models.backbone import load_backbone  # noqa: E402
from proctor.models.demo import DEMO_HEADS_DIR  # noqa: E402
from proctor.models.heads import read_head_file  # noqa: E402
from proctor.models.training import evaluate, list_images  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STREAM_JS = ROOT / "proctor" / "web" / "static" / "stream.js"

# In the page: stream.js as a module (from a blob: URL, so no server is needed) and `draw`, which puts a PNG on
# a canvas as ScreenStreamer draws a capture: scaledSize to the client width, smoothContext, drawImage.
_LOAD_MODULE = """async (source) => {
    const url = URL.createObjectURL(new Blob([source], {type: "text/javascript"}));
    const m = await import(url);
    window.draw = async (png, maxWidth, smoothing) => {
        const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
        const bitmap = await createImageBitmap(new Blob([bytes], {type: "image/png"}));
        const [w, h] = m.scaledSize(bitmap.width, bitmap.height, maxWidth);
        const canvas = document.createElement("canvas");
        canvas.width = w;
        canvas.height = h;
        const ctx = m.smoothContext(canvas);
        if (smoothing !== "high") ctx.imageSmoothingQuality = smoothing;
        ctx.drawImage(bitmap, 0, 0, w, h);
        return canvas;
    };
}"""
# The frame's JPEG (base64), encoded as the page encodes it.
_FRAME = """async ([png, maxWidth, quality, smoothing]) => {
    const canvas = await window.draw(png, maxWidth, smoothing);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", quality));
    const out = new Uint8Array(await blob.arrayBuffer());
    let text = "";
    for (let i = 0; i < out.length; i += 8192) text += String.fromCharCode(...out.subarray(i, i + 8192));
    return btoa(text);
}"""
# The canvas's pixels before JPEG encoding, to compare with PIL's resampling filters.
_DRAWN = """async ([png, maxWidth]) => {
    const canvas = await window.draw(png, maxWidth, "high");
    return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
}"""
PIL_FILTERS = {f.name.lower(): f for f in (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.HAMMING,
                                           Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)}


def _png(image: Image.Image) -> str:
    data = io.BytesIO()
    image.save(data, "PNG")
    return base64.b64encode(data.getvalue()).decode()


def in_chromium(work):
    """work(page) in a headless Chromium page where stream.js is loaded and `window.draw` is defined."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.evaluate(_LOAD_MODULE, STREAM_JS.read_text())
            return work(page)
        finally:
            browser.close()


def browser_frames(page, images: list[Image.Image], client_width: int, quality: float, smoothing: str) -> list[bytes]:
    """Each screenshot's JPEG as the student page's canvas makes it."""
    return [base64.b64decode(page.evaluate(_FRAME, [_png(image), client_width, quality, smoothing]))
            for image in images]


def filter_agreement(page, images: list[Image.Image], client_width: int) -> dict[str, dict[str, float]]:
    """Per source width: mean grey-level difference between the canvas's drawing and each PIL filter's.

    The captured screens come 960-1280 wide; each is also drawn upscaled to 1920 (smoother than a real
    1920 screen) for the common 3x case.
    """
    differences: dict[str, dict[str, list[float]]] = {}
    for image in images:
        for source in (image, image.resize((1920, round(image.height * 1920 / image.width)), Image.LANCZOS)):
            if source.width <= client_width:
                continue
            w, h = client_width, round(source.height * client_width / source.width)
            drawn = np.array(page.evaluate(_DRAWN, [_png(source), w]), np.float32).reshape(h, w, 4)[:, :, :3]
            row = differences.setdefault(f"{source.width}->{w}", {})
            for name, resampling in PIL_FILTERS.items():
                pil = np.asarray(source.resize((w, h), resampling), np.float32)
                row.setdefault(name, []).append(float(np.abs(drawn - pil).mean()))
    return {size: {name: round(float(np.mean(v)), 3) for name, v in row.items()}
            for size, row in sorted(differences.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=Path, default=ROOT / "data" / "screens-heldout")
    parser.add_argument("--canvas-smoothing", choices=("high", "medium", "low"), default="high",
                        help="the canvas's imageSmoothingQuality (the page asks for high; low: as it did before)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "cache")
    parser.add_argument("--backbone-weights", default="bundled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"browser_frames-{args.canvas_smoothing}.json"

    config = Config()
    heads = [read_head_file(p) for p in sorted(DEMO_HEADS_DIR.glob("*.safetensors"))]
    folders = sorted(p for p in args.heldout.iterdir() if p.is_dir()) if args.heldout.is_dir() else []
    if not folders or not heads:
        print(f"benchmarks/browser_frames.py: needs the demo heads and program folders in {args.heldout}",
              file=sys.stderr)
        return 2
    backbone = load_backbone(args.backbone_weights, args.cache_dir)
    size = (backbone.spec.preprocessing.width, backbone.spec.preprocessing.height)
    paths, programs = [], []
    for folder in folders:
        found = list_images(folder, "held-out")
        paths += found
        programs += [folder.name] * len(found)
    images = [Image.open(p).convert("RGB") for p in paths]

    python_inputs = [decode.served_frame(np.asarray(im), size, config.client_max_width, config.client_jpeg_quality)
                     for im in images]
    jpegs, filters = in_chromium(lambda page: (
        browser_frames(page, images, config.client_max_width, config.client_jpeg_quality, args.canvas_smoothing),
        filter_agreement(page, images[::6], config.client_max_width)))
    browser_inputs = [decode.decode_rgb(j, size) for j in jpegs]
    pixel_diff = [float(np.abs(a.astype(np.float32) - b).mean()) for a, b in zip(python_inputs, browser_inputs)]

    def scores(frames: list[np.ndarray]) -> np.ndarray:
        return head_scores(heads, len(frames), lambda pooling: backbone.extract(frames, pooling=pooling))

    python_scores, browser_scores = scores(python_inputs), scores(browser_inputs)
    programs_arr = np.array(programs)
    per_head = {}
    for j, head in enumerate(heads):
        labels = (programs_arr == head.name).astype(int)
        python_says = python_scores[:, j] >= head.threshold
        browser_says = browser_scores[:, j] >= head.threshold
        differ = np.flatnonzero(python_says != browser_says)
        browser = evaluate(browser_scores[:, j], labels, head.threshold)
        per_head[head.name] = {
            "balanced_accuracy_browser": browser["balanced_accuracy"],
            "balanced_accuracy_python": evaluate(python_scores[:, j], labels, head.threshold)["balanced_accuracy"],
            "decisions_that_differ": [str(Path(paths[i]).relative_to(args.heldout)) for i in differ],
            "max_score_difference": round(float(np.abs(python_scores[:, j] - browser_scores[:, j]).max()), 4),
            "browser_fn": browser["fn"], "browser_fp": browser["fp"]}
    result = {"benchmark": "browser_frames", "heldout": str(args.heldout.relative_to(ROOT)), "frames": len(images),
              "client_width": config.client_max_width, "jpeg_quality": config.client_jpeg_quality,
              "canvas_smoothing": args.canvas_smoothing,
              "training_resampling": decode.PAGE_RESAMPLING.name.lower(),
              "input_pixel_difference": {"mean": round(float(np.mean(pixel_diff)), 3),
                                         "max": round(float(np.max(pixel_diff)), 3)},
              "canvas_against_pil_filters": filters,
              "decisions": len(images) * len(heads),
              "decisions_that_differ": sum(len(h["decisions_that_differ"]) for h in per_head.values()),
              "min_balanced_accuracy_browser": min(h["balanced_accuracy_browser"] for h in per_head.values()),
              "heads": per_head, "browser": CHROMIUM,
              "machine": describe_machine(torch=torch.__version__)}
    print(json.dumps(result, indent=2))
    write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
