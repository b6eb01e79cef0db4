"""Loading by directory or hub name, one shared ViT, and sizes read from the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3_serve_core.checkpoint import CheckpointUnavailableError, load_geometry, load_sam3, resolve_compile
from sam3_serve_core.compilation import REGIONS, compile_layers
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.conftest import random_image


def test_one_vit_serves_both_heads(tiny112_dir):
    models = load_sam3(str(tiny112_dir))
    detector_backbone = models.detector.vision_encoder.backbone
    tracker_backbone = models.tracker.vision_encoder.backbone
    assert tracker_backbone is detector_backbone
    tracker_params = dict(tracker_backbone.named_parameters())
    for name, param in detector_backbone.named_parameters():
        assert tracker_params[name].data_ptr() == param.data_ptr(), f"{name} is a copy, not the same storage"
    # The tracker's neck is its own (tracker_neck.* weights), not the detector's.
    assert models.tracker.vision_encoder.neck is not models.detector.vision_encoder.neck


@pytest.mark.parametrize("size", [56, 112])
def test_sizes_come_from_the_checkpoint(size):
    from tests.conftest import tiny_checkpoint_dir

    geometry = load_geometry(str(tiny_checkpoint_dir(size)))
    assert geometry.image_size == size
    assert geometry.mask_size == 4 * size // 14
    assert geometry.text_max_tokens == 32


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointUnavailableError, match="does not exist"):
        load_geometry(str(tmp_path / "no-such-checkpoint"))


def test_a_directory_without_a_config_is_not_a_sam3_checkpoint(tmp_path):
    with pytest.raises(CheckpointUnavailableError, match="not a SAM 3 checkpoint: it has no config.json"):
        load_geometry(str(tmp_path))


def test_a_directory_of_another_model_is_not_a_sam3_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointUnavailableError, match="model_type 'bert'"):
        load_sam3(str(tmp_path))


def test_a_sam3_directory_without_its_weights_is_incomplete(tmp_path, tiny112_dir):
    (tmp_path / "config.json").write_text((tiny112_dir / "config.json").read_text())
    with pytest.raises(CheckpointUnavailableError, match="is incomplete"):
        load_sam3(str(tmp_path))


def test_unreachable_hub_names_the_directory_option():
    """No hub is reachable from CI: the error must say so and point at the directory setting."""
    with pytest.raises(CheckpointUnavailableError, match="local directory"):
        load_geometry("facebook/sam3")


def test_unknown_dtype_is_refused(tiny112_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_sam3(str(tiny112_dir), dtype="float8")


def test_bfloat16_runs_on_cpu(tiny112_dir):
    """bf16 is a GPU option; on CPU it must at least run end to end and keep the output contract."""
    models = load_sam3(str(tiny112_dir), dtype="bfloat16")
    assert models.detector.dtype == torch.bfloat16
    pipeline = Sam3Pipeline(models)
    for prompt in ({"text": "cat"}, {"boxes": [[5, 5, 50, 40]], "labels": [1]}, {"points": [[20, 30]], "labels": [1]}):
        result = pipeline.segment(random_image(60, 90), **prompt)
        assert result.union_mask.shape == (60, 90) and result.union_mask.dtype == np.uint8
        assert result.masks.shape[1:] == (60, 90)


@pytest.mark.parametrize(
    "setting, device, compiled", [("auto", "cuda", True), ("auto", "cpu", False), (True, "cpu", True), (False, "cuda", False)]
)
def test_compile_auto_means_on_a_gpu(setting, device, compiled):
    assert resolve_compile(setting, device) is compiled


@pytest.mark.parametrize("regions", [tuple(REGIONS), ("vision",), ("detr_encoder", "detr_decoder")])
def test_compile_marks_only_the_layers_of_its_regions(tiny112_dir, regions):
    models = load_sam3(str(tiny112_dir), compile=True, compile_regions=regions)
    assert models.compiled and models.compiled_regions == regions
    marked = {name for name, module in models.detector.named_modules() if module._compiled_call_impl is not None}
    stacks = [REGIONS[region] for region in regions]
    expected = {f"{stack}.{index}" for stack in stacks for index in range(len(models.detector.get_submodule(stack)))}
    assert marked == expected
    assert not load_sam3(str(tiny112_dir)).compiled


def test_unknown_compile_regions_are_refused(tiny112_dir):
    with pytest.raises(ValueError, match="unknown compile regions"):
        compile_layers(load_sam3(str(tiny112_dir)).detector, ("vision", "mask_decoder"))
