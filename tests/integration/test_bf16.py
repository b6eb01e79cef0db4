"""bf16 stays close to float32, within one stated bound, on the tiny and the mid random-weight checkpoints.

`benchmarks/bf16_parity.py` measures it (4 images x 6 prompts, every query matched by index; `cast` is the model
cast to bf16, what `dtype: bfloat16` and a GPU's `dtype: auto` do; `autocast` is float32 weights under
`torch.autocast`). Measured with torch 2.14 on CPU, and with torch 2.11 on an H100 for the full configuration:

| checkpoint, device, mode | mean IoU | min IoU | max abs score diff | max abs box diff | flips |
|---|---|---|---|---|---|
| tiny 112 px, CPU, cast | >= 0.973 | >= 0.948 | 0.021 | 4.2 px | 5 / 320 |
| tiny 112 px, CPU, autocast | >= 0.991 | >= 0.985 | 0.018 | 0.03 px | 4 / 160 |
| mid (504 px), CPU, cast | 0.984 | 0.952 | 0.060 | 2.8 px | 5 / 400 |
| full (1008 px), H100, cast | 0.997 | 0.955 | 0.055 | 7.4 px | 17 / 1600 |
| full (1008 px), H100, autocast | 0.998 | 0.977 | 0.027 | 0.24 px | 10 / 1600 |

The bound below covers every row with room: mean IoU >= 0.95, min IoU >= 0.90, scores within 0.1, boxes within
12 px (on images of at most 640 px), at most 4% of queries kept in one precision and dropped in the other (a
query flips when its score is within the score difference of the threshold: how many do depends on how the
random weights spread the scores). The
checkpoints' masks are meaningless (random weights); only the agreement between precisions matters.
"""

from __future__ import annotations

import pytest

from benchmarks.bf16_parity import KINDS, MODES, measure
from tests.conftest import preset_checkpoint_dir, tiny_checkpoint_dir

MEAN_IOU = 0.95
MIN_IOU = 0.90
SCORE_DIFF = 0.1
BOX_DIFF_PX = 12.0
FLIP_FRACTION = 0.04

CHECKPOINTS = {"tiny112": lambda: tiny_checkpoint_dir(112), "mid": lambda: preset_checkpoint_dir("mid")}


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=str)
def parity(request):
    return measure(str(CHECKPOINTS[request.param]()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_stays_within_the_stated_bound(parity, mode, kind):
    agreement = parity[mode][kind]
    if isinstance(agreement, str) and (mode, kind) == ("autocast", "box"):
        pytest.xfail(
            "CPU autocast cannot run box prompts: transformers casts roi_align's bf16 input to float16, and "
            f"CPU autocast's torch.cat refuses float16 ({agreement}); on a GPU it runs (see the table above)"
        )
    assert not isinstance(agreement, str), agreement
    assert agreement.mean_iou >= MEAN_IOU
    assert agreement.min_iou >= MIN_IOU
    assert agreement.max_score_diff <= SCORE_DIFF
    assert agreement.max_box_diff_px <= BOX_DIFF_PX
    assert agreement.flips <= FLIP_FRACTION * agreement.queries
