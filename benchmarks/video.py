"""Video tracking through the application against transformers' own loop in one process, side by side.

    python -m benchmarks.video [--preset tiny|mid|full | --checkpoint DIR] [--device cpu|cuda]
                               [--dtype auto|float32|bfloat16] [--frames 60] [--width 320 --height 240] [--markdown]

For each task (concepts: a text; objects: two clicked objects), the same generated video (shapes moving over
a background, encoded losslessly) is tracked by:
- **transformers**: `Sam3VideoProcessor` / `Sam3TrackerVideoProcessor` `init_video_session(video=frames)`, the
  prompt, `propagate_in_video_iterator` and the post-processing, in this process (the frames already decoded);
- **the service**: `Sam3HttpClient.track()` on the file's bytes: upload, decoding, the session's prompt and the
  stream read as it arrives, over HTTP, from the application started as the tests start it (the CPU profile on
  a machine without a GPU, serve_config.yaml's GPU profile on cuda), one model replica.

Both run in the same dtype (`--dtype`; auto: bfloat16 on cuda, float32 on a CPU, as the service chooses).

Reported: frames/s over the whole video (the service's includes its upload, decoding and session), the time to
the first frame, and the time between frames as the stream is read (median and 95th percentile). Random-weight
checkpoints cost what real ones cost; their masks are meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ray import serve
from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor, Sam3VideoModel, Sam3VideoProcessor

from benchmarks.compare import app_config, preset_checkpoint, print_table
from benchmarks.machine import cpu_name, git_commit
from client import Sam3HttpClient
from sam3_serve_core.checkpoint import DTYPES, resolve_dtype
from tests.videos import encode_video, moving_shapes
from tools.launch import APP_NAME, free_port, serve_run, start_local_ray

TEXT = "red square"


def clicks(width: int, height: int) -> dict:
    """Two objects, one click each: the square's first position and the disc's (`tests.videos.moving_shapes`)."""
    return {"points": [[[15 * width / 96, 20 * height / 72]], [[60 * width / 96, 26 * height / 72]]], "labels": [[1], [1]]}


def video(frames: int, width: int, height: int) -> list[np.ndarray]:
    """`moving_shapes` scaled to `width` x `height` (nearest neighbour: the shapes stay sharp)."""
    small = moving_shapes(frames)
    rows = np.arange(height) * small[0].shape[0] // height
    cols = np.arange(width) * small[0].shape[1] // width
    return [frame[rows][:, cols] for frame in small]


@torch.inference_mode()
def transformers_loop(checkpoint: str, frames: list[np.ndarray], task: str, device: str, dtype: str) -> list[float]:
    """The seconds at which each frame's result was ready, from the session's start."""
    if task == "concepts":
        processor, model = Sam3VideoProcessor.from_pretrained(checkpoint), Sam3VideoModel.from_pretrained(checkpoint)
    else:
        processor, model = Sam3TrackerVideoProcessor.from_pretrained(checkpoint), Sam3TrackerVideoModel.from_pretrained(checkpoint)
    model = model.to(device, dtype=DTYPES[dtype]).eval()
    height, width = frames[0].shape[:2]
    started = time.perf_counter()
    session = processor.init_video_session(video=frames, inference_device=device, dtype=DTYPES[dtype])
    if task == "concepts":
        processor.add_text_prompt(session, TEXT)
    else:
        prompt = clicks(width, height)
        processor.add_inputs_to_inference_session(
            inference_session=session, frame_idx=0, obj_ids=[1, 2], input_points=[prompt["points"]], input_labels=[prompt["labels"]]
        )
        model(inference_session=session, frame_idx=0)
    ready = []
    for output in model.propagate_in_video_iterator(session):
        if task == "concepts":
            processor.postprocess_outputs(session, output)["masks"].cpu()
        else:
            processor.post_process_masks([output.pred_masks], original_sizes=[[height, width]], binarize=True)[0].cpu()
        ready.append(time.perf_counter() - started)
    return ready


def service(url: str, data: bytes, task: str, width: int, height: int) -> list[float]:
    with Sam3HttpClient(url, timeout=600) as client:
        started = time.perf_counter()
        prompt = {"text": TEXT} if task == "concepts" else clicks(width, height)
        return [time.perf_counter() - started for _ in client.track(data, **prompt)]


def row(name: str, ready: list[float]) -> list[str]:
    gaps = np.diff(ready) * 1000 if len(ready) > 1 else np.zeros(1)
    return [
        name,
        f"{len(ready) / ready[-1]:.2f}",
        f"{ready[0] * 1000:.0f}",
        f"{statistics.median(gaps):.0f}",
        f"{np.percentile(gaps, 95):.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=("tiny", "mid", "full"), default="tiny")
    source.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    checkpoint = str(args.checkpoint or preset_checkpoint(args.preset))
    dtype = resolve_dtype(args.dtype, args.device)
    frames = video(args.frames, args.width, args.height)
    data = encode_video(frames, "matroska", "ffv1")
    print(
        f"commit {git_commit()}, {cpu_name()}, {args.device}, {dtype}, torch threads {torch.get_num_threads()}; checkpoint "
        f"{checkpoint} ({'random weights: masks meaningless' if not args.checkpoint else 'given'}); "
        f"{args.frames} frames of {args.width}x{args.height}"
    )
    tasks, ready = ("concepts", "objects"), {}
    for task in tasks:
        transformers_loop(checkpoint, frames[:2], task, args.device, dtype)  # warm: the first pass pays one-off costs
        ready[task, "transformers, one process"] = transformers_loop(checkpoint, frames, task, args.device, dtype)
    ray_address, port = start_local_ray(), free_port()
    with tempfile.TemporaryDirectory() as workdir:
        url = serve_run(app_config(Path(checkpoint), port, args.device, None, dtype=dtype), Path(workdir) / "config.yaml", ray_address)
        for task in tasks:
            service(url, encode_video(frames[:2], "matroska", "ffv1"), task, args.width, args.height)  # warm
            ready[task, "service, over HTTP"] = service(url, data, task, args.width, args.height)
        serve.delete(APP_NAME)
    print_table(
        "Video tracking: frames/s and per-frame latency as the results are read",
        ["task and path", "frames/s", "first frame (ms)", "between frames: median (ms)", "p95 (ms)"],
        [row(f"{task}: {path}", times) for (task, path), times in sorted(ready.items())],
        args.markdown,
    )


if __name__ == "__main__":
    main()
