"""Offline demo: serve SAM 3 on this machine's CPU and segment a sample photo over HTTP.

    python -m tools.demo [--out DIR] [--checkpoint DIR_OR_HUB_NAME] [--port N]

It runs what a user runs: the CPU profile of serve_config.yaml started with `serve run`, and the HTTP
client. With no --checkpoint it builds the tiny random-weight checkpoint, so it needs no network and no
GPU, but then THE MASKS ARE MEANINGLESS: the demo shows that the service works, not what SAM 3 sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import ray
from PIL import Image, ImageDraw
from ray import serve
from skimage import data

from client import Sam3HttpClient
from sam3_serve_core.checkpoint import is_tiny_checkpoint
from tools.launch import REPO, SERVE_CONFIG, cpu_config, serve_run, start_local_ray

TINY_DIR = REPO / ".cache" / "demo" / "tiny-112"
DEFAULT_OUT = REPO / ".cache" / "demo" / "out"
DEPLOY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
# Logical CPUs: the CPU profile's four fractional replicas then fit on a two-core machine.
RAY_CPUS = 4
MASK_COLOR = np.array([30, 144, 255])
MASK_ALPHA = 0.5
PROMPT_COLOR = (255, 220, 0)


def tiny_checkpoint() -> str:
    """The tiny checkpoint at model size 112, built once into .cache/demo (the marker is written last)."""
    if not is_tiny_checkpoint(str(TINY_DIR)):
        from tools.tiny_checkpoint import build_tiny_checkpoint

        build_tiny_checkpoint(TINY_DIR, image_size=112)
    return str(TINY_DIR)


def prompts_for(width: int, height: int) -> dict[str, dict]:
    """One prompt of each type: the text 'cat', a box around the middle, and a point at the centre."""
    box = [width / 4, height / 4, 3 * width / 4, 3 * height / 4]
    return {
        "text": {"text": "cat"},
        "box": {"boxes": [box], "labels": [1]},
        "point": {"points": [[width / 2, height / 2]], "labels": [1]},
    }


def overlay(photo: np.ndarray, mask: np.ndarray, prompt: dict) -> Image.Image:
    """The photo with the union mask tinted and the prompt (text, box or point) drawn on top."""
    tinted = photo.astype(np.float32)
    selected = mask > 0
    tinted[selected] = (1 - MASK_ALPHA) * tinted[selected] + MASK_ALPHA * MASK_COLOR
    image = Image.fromarray(tinted.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if "text" in prompt:
        draw.text((8, 8), f'text: "{prompt["text"]}"', fill=PROMPT_COLOR)
    for box in prompt.get("boxes", []):
        draw.rectangle(box, outline=PROMPT_COLOR, width=3)
    for x, y in prompt.get("points", []):
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=PROMPT_COLOR, outline=(0, 0, 0), width=2)
    return image


def segment_sample(base_url: str, out: Path) -> None:
    """Segment the sample photo with each prompt through the HTTP client; save and report the overlays."""
    photo = data.chelsea()
    height, width = photo.shape[:2]
    sample = out / "sample.png"
    Image.fromarray(photo).save(sample)
    print(f"sample photo: {sample} ({width}x{height}, scikit-image's chelsea)")
    with Sam3HttpClient(base_url, timeout=REQUEST_TIMEOUT_S) as client:
        for name, prompt in prompts_for(width, height).items():
            result = client.run_with_detections(str(sample), **prompt)
            path = out / f"overlay_{name}.png"
            overlay(photo, result["union_mask"], prompt).save(path)
            # A point prompt answers one object as its union mask, with no instances or scores.
            instances = f"{len(result['masks'])} instance(s)" if name != "point" else "1 object"
            top_score = f"{result['scores'][0]:.3f}" if result["scores"] else "-"
            foreground = 100 * np.count_nonzero(result["union_mask"]) / result["union_mask"].size
            print(
                f"{name:5s} prompt {_describe(prompt)}: {instances}, {foreground:.1f}% foreground, "
                f"top score {top_score} -> {path}"
            )


def _describe(prompt: dict) -> str:
    if "text" in prompt:
        return repr(prompt["text"])
    coordinates = prompt.get("boxes") or prompt["points"]
    return str([[round(value) for value in item] for item in coordinates])


def run(out: Path, checkpoint: str | None, port: int) -> None:
    """Write the CPU profile, start Ray and the app, segment the sample, and always shut down."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint or tiny_checkpoint()
    print(f"checkpoint: {checkpoint}")
    if is_tiny_checkpoint(checkpoint):
        print(
            "NOTE: this is the tiny checkpoint with RANDOM weights: its masks, boxes and scores are meaningless.\n"
            "      It shows that the service runs end to end, not what SAM 3 sees. For real weights, run\n"
            "      `bash tools/demo.sh --checkpoint /path/to/sam3` (or set `args.models` in "
            f"{SERVE_CONFIG.name})."
        )
    config_path = out / "serve_config.cpu.yaml"
    try:
        ray_address = start_local_ray(RAY_CPUS)
        print(f"started Ray ({RAY_CPUS} logical CPUs); `serve run {config_path}` ...")
        base_url = serve_run(cpu_config(checkpoint, port), config_path, ray_address, DEPLOY_TIMEOUT_S)
        print(f"application sam3 is running at {base_url}")
        segment_sample(base_url, out)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
            print("shut down Serve and Ray")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--checkpoint", help="a SAM 3 checkpoint directory or hub name (default: the tiny one)")
    parser.add_argument("--port", type=int, default=8000, help="the HTTP port to serve on (default: 8000)")
    args = parser.parse_args(argv)
    try:
        run(args.out.resolve(), args.checkpoint, args.port)
    except Exception as error:  # the one place that turns any failure into a message and an exit code
        print(f"demo failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"demo done: overlays in {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
