"""bf16 stays close to float32, within bounds measured on the tiny checkpoint with margin.

`benchmarks/bf16_parity.py` measures it (4 images x 6 prompts, every query matched by index). On the tiny
112 px checkpoint, CPU, torch 2.14, both modes (`cast`: the model cast to bf16; `autocast`: float32 weights
under `torch.autocast`) gave: mask IoU mean >= 0.989 and min >= 0.955, |score difference| <= 0.024, box
difference <= 2.3 px, and no instance kept in one precision and dropped in the other. The bounds below
leave about twice that room. The tiny checkpoint's masks are meaningless (random weights); only the
agreement between precisions matters.
"""

from __future__ import annotations

import pytest

from benchmarks.bf16_parity import KINDS, MODES, measure

MEAN_IOU = 0.97
MIN_IOU = 0.90
SCORE_DIFF = 0.05
BOX_DIFF_PX = 5.0
FLIP_FRACTION = 0.02


@pytest.fixture(scope="module")
def parity(tiny112_dir):
    return measure(str(tiny112_dir))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_stays_within_the_measured_bound(parity, mode, kind):
    agreement = parity[mode][kind]
    if isinstance(agreement, str) and (mode, kind) == ("autocast", "box"):
        pytest.xfail(
            "CPU autocast cannot run box prompts: transformers casts roi_align's bf16 input to float16, and "
            f"CPU autocast's torch.cat refuses float16 ({agreement})"
        )
    assert not isinstance(agreement, str), agreement
    assert agreement.mean_iou >= MEAN_IOU
    assert agreement.min_iou >= MIN_IOU
    assert agreement.max_score_diff <= SCORE_DIFF
    assert agreement.max_box_diff_px <= BOX_DIFF_PX
    assert agreement.flips <= FLIP_FRACTION * agreement.queries
