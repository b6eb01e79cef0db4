"""bf16 against float32 on the same inputs: how far masks, scores and boxes move, and which instances flip.

    python -m benchmarks.bf16_parity [--preset tiny|mid] [--checkpoint DIR] [--device cpu]
                                     [--compiled [--dtype float32|bfloat16]]

Two ways to run in bf16, each against the float32 model on the same prepared inputs:
  cast      `load_sam3(..., dtype="bfloat16")`: the whole model cast with `.to(bfloat16)` (what `dtype` does);
  autocast  the float32 model under `torch.autocast(dtype=torch.bfloat16)`, as the SAM 3 maintainers advise
            (from the outside: the runner is called inside the autocast context).
Concept instances are matched by query (every query leaves the runner, so none is lost to the threshold),
point prompts by prompt. Masks are compared at the image's full size, as the API returns them. IoU and box
differences are over the instances float32 keeps (score > 0.5), score differences over all queries (the
tracker's IoU score for points); a flip is a query kept in one precision and dropped in the other. A kind
of prompt that a mode cannot run is reported with its error.
Without --checkpoint it builds the preset's random-weight checkpoint: its masks are meaningless, only the
agreement between precisions matters. bf16 on a CPU without native bf16 is slow: this measures, not times.
--compiled measures instead the model with its layers compiled (`compile: true`) against the same model
uncompiled, both in --dtype: the same function through other kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sam3_serve_core.checkpoint import Sam3Models, load_sam3
from sam3_serve_core.compilation import REGIONS
from sam3_serve_core.masks import concept_masks_to_uint8, tracker_masks_to_uint8
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.pipeline import prepare_item
from sam3_serve_core.postprocess import ConceptOutput, RawOutput
from sam3_serve_core.runner import Sam3Runner
from tests.conftest import random_image
from tools.tiny_checkpoint import build_tiny_checkpoint

MODES = ("cast", "autocast")
SCORE_THRESHOLD = 0.5
# (height, width, seed) of the test images.
IMAGES = ((480, 640, 0), (300, 451, 1), (640, 480, 2), (200, 200, 3))
# (kind, prompt) pairs, coordinates in fractions of the image's width and height; every image gets all.
PROMPTS = (
    ("text", {"text": "cat"}),
    ("text", {"text": "a red car"}),
    ("box", {"boxes": [[0.2, 0.25, 0.7, 0.75]], "labels": [1]}),
    ("box", {"boxes": [[0.1, 0.1, 0.5, 0.6], [0.55, 0.4, 0.9, 0.9]], "labels": [1, 0]}),
    ("point", {"points": [[0.5, 0.5]], "labels": [1]}),
    ("point", {"points": [[0.3, 0.4], [0.7, 0.6]], "labels": [1, 0]}),
)
KINDS = ("text", "box", "point")


@dataclass
class Agreement:
    """How one bf16 mode agrees with float32 on one kind of prompt."""

    instances: int = 0  # kept by float32 (concept prompts), or one per point prompt
    queries: int = 0  # compared for keep/drop (concept prompts only)
    ious: list[float] = field(default_factory=list)
    max_score_diff: float = 0.0
    max_box_diff_px: float = 0.0
    flips: int = 0

    def add(self, other: Agreement) -> None:
        self.instances += other.instances
        self.queries += other.queries
        self.ious += other.ious
        self.max_score_diff = max(self.max_score_diff, other.max_score_diff)
        self.max_box_diff_px = max(self.max_box_diff_px, other.max_box_diff_px)
        self.flips += other.flips

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious))

    @property
    def min_iou(self) -> float:
        return float(np.min(self.ious))


def prepared_items(models: Sam3Models) -> list[PreparedItem]:
    """One item per image holding every prompt, in PROMPTS order: one vision pass per image."""
    items = []
    for height, width, seed in IMAGES:
        image = random_image(height, width, seed)
        prepared = [
            prepare_item(
                image, tokenizer=models.tokenizer, geometry=models.geometry, **_in_pixels(prompt, height, width)
            )
            for _, prompt in PROMPTS
        ]
        prompts = [prompt for item in prepared for prompt in item.prompts]
        items.append(PreparedItem(pixels=prepared[0].pixels, original_size=(height, width), prompts=prompts))
    return items


def _in_pixels(prompt: dict, height: int, width: int) -> dict:
    scale = {"points": [width, height], "boxes": [width, height, width, height]}
    return {key: (np.asarray(value) * scale[key]).tolist() if key in scale else value for key, value in prompt.items()}


def run(
    models: Sam3Models, items: list[PreparedItem], autocast: bool = False
) -> tuple[list[dict[int, RawOutput]], dict[str, str]]:
    """Every query of every prompt (threshold -inf) by prompt index, and the kinds that fail, with why.

    When an image's run fails, its kinds are run one at a time to find the failing ones, which later
    images leave out. A fresh runner: no text encoding cached from another precision.
    """
    runner = Sam3Runner(models, score_threshold=float("-inf"))
    precision = torch.autocast(models.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    failures: dict[str, str] = {}
    outputs = []
    with precision:
        for item in items:
            slots = [slot for slot, (kind, _) in enumerate(PROMPTS) if kind not in failures]
            try:
                outputs.append(_run_slots(runner, item, slots))
                continue
            except RuntimeError:
                outputs.append({})
            for kind in KINDS:
                try:
                    outputs[-1].update(_run_slots(runner, item, [slot for slot in slots if PROMPTS[slot][0] == kind]))
                except RuntimeError as error:
                    failures[kind] = f"fails: {type(error).__name__}: {str(error).splitlines()[0]}"
    return outputs, failures


def _run_slots(runner: Sam3Runner, item: PreparedItem, slots: list[int]) -> dict[int, RawOutput]:
    if not slots:
        return {}
    prompts = [item.prompts[slot] for slot in slots]
    subset = PreparedItem(pixels=item.pixels, original_size=item.original_size, prompts=prompts)
    return {slot: _on_host(output) for slot, output in zip(slots, runner.forward([subset])[0])}


def _on_host(output: RawOutput) -> RawOutput:
    """The raw output's tensors as float32 numpy arrays, off the device."""
    tensors = {
        member.name: getattr(output, member.name).float().cpu().numpy()
        for member in dataclasses.fields(output)
        if isinstance(getattr(output, member.name), torch.Tensor)
    }
    return dataclasses.replace(output, **tensors)


def compare(reference: RawOutput, candidate: RawOutput, original_size: tuple[int, int]) -> Agreement:
    height, width = original_size
    if not isinstance(reference, ConceptOutput):
        masks = [
            tracker_masks_to_uint8(torch.tensor(out.mask_logits), height, width, chunk_size=1)[0]
            for out in (reference, candidate)
        ]
        score_diff = float(abs(reference.iou_score - candidate.iou_score))
        return Agreement(instances=1, ious=[_iou(*masks)], max_score_diff=score_diff)
    kept = reference.scores > SCORE_THRESHOLD
    masks = [
        concept_masks_to_uint8(torch.tensor(out.mask_logits[kept]), height, width, chunk_size=8)
        for out in (reference, candidate)
    ]
    box_diff = np.abs(reference.boxes[kept] - candidate.boxes[kept]) * np.array([width, height, width, height])
    return Agreement(
        instances=int(kept.sum()),
        queries=len(kept),
        ious=[_iou(a, b) for a, b in zip(*masks)],
        max_score_diff=float(np.abs(reference.scores - candidate.scores).max()),
        max_box_diff_px=float(box_diff.max(initial=0.0)),
        flips=int((kept != (candidate.scores > SCORE_THRESHOLD)).sum()),
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def measure(checkpoint: str, device: str = "cpu") -> dict[str, dict[str, Agreement | str]]:
    """Per mode and prompt kind: its agreement with float32, or why it fails to run."""
    fp32 = load_sam3(checkpoint, device=device)
    items = prepared_items(fp32)
    reference, reference_failures = run(fp32, items)
    if reference_failures:
        raise RuntimeError(f"float32 itself fails: {reference_failures}")
    candidates = {
        "cast": run(load_sam3(checkpoint, device=device, dtype="bfloat16"), items),
        "autocast": run(fp32, items, autocast=True),
    }
    results: dict[str, dict[str, Agreement | str]] = {}
    for mode, (outputs, failures) in candidates.items():
        results[mode] = {kind: failures.get(kind) or Agreement() for kind in KINDS}
        for item, ref_outputs, candidate_outputs in zip(items, reference, outputs):
            for slot, candidate in candidate_outputs.items():
                if PROMPTS[slot][0] not in failures:
                    results[mode][PROMPTS[slot][0]].add(compare(ref_outputs[slot], candidate, item.original_size))
    return results


def measure_compiled(checkpoint: str, device: str = "cpu", dtype: str = "float32") -> dict[str, dict[str, Agreement]]:
    """The agreement of the model with every stack of layers compiled (a superset of any `compile_regions`) with
    the uncompiled one, per prompt kind, in one dtype."""
    eager = load_sam3(checkpoint, device=device, dtype=dtype)
    items = prepared_items(eager)
    compiled = load_sam3(checkpoint, device, dtype, compile=True, compile_regions=tuple(REGIONS))
    (reference, _), (outputs, failures) = run(eager, items), run(compiled, items)
    if failures:
        raise RuntimeError(f"the compiled model fails: {failures}")
    agreements = {kind: Agreement() for kind in KINDS}
    for item, ref_outputs, candidate_outputs in zip(items, reference, outputs):
        for slot, candidate in candidate_outputs.items():
            agreements[PROMPTS[slot][0]].add(compare(ref_outputs[slot], candidate, item.original_size))
    return {"compiled": agreements}


def format_table(results: dict[str, dict[str, Agreement | str]]) -> str:
    lines = [
        f"{'mode':<10}{'prompts':<8}{'instances':>10}{'mean IoU':>10}{'min IoU':>10}{'max |dscore|':>14}"
        f"{'max |dbox| px':>15}{'flips':>10}"
    ]
    for mode, kinds in results.items():
        for kind, agreement in kinds.items():
            if isinstance(agreement, str):
                lines.append(f"{mode:<10}{kind:<8}  {agreement}")
                continue
            concept = agreement.queries > 0
            lines.append(
                f"{mode:<10}{kind:<8}{agreement.instances:>10}{agreement.mean_iou:>10.4f}{agreement.min_iou:>10.4f}"
                f"{agreement.max_score_diff:>14.4f}"
                f"{f'{agreement.max_box_diff_px:.3f}' if concept else '-':>15}"
                f"{f'{agreement.flips}/{agreement.queries}' if concept else '-':>10}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=["tiny", "mid"], default="tiny")
    source.add_argument("--checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true", help="compiled against uncompiled, in --dtype")
    parser.add_argument("--dtype", default="float32", help="with --compiled: both models' dtype")
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(tempfile.mkdtemp(), preset=args.preset))
    started = time.perf_counter()
    if args.compiled:
        results = measure_compiled(checkpoint, args.device, args.dtype)
        what = f"compiled vs uncompiled ({args.dtype})"
    else:
        results = measure(checkpoint, args.device)
        what = "bf16 vs float32"
    source = args.checkpoint or f"the {args.preset} random-weight checkpoint"
    print(
        f"{what} on {source}, device {args.device}, {len(IMAGES)} images x {len(PROMPTS)} prompts, "
        f"score threshold {SCORE_THRESHOLD}, torch threads {torch.get_num_threads()}"
    )
    print(format_table(results))
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
