"""The random-weight checkpoints: deterministic, in the real `facebook/sam3` layout, loadable by both heads.

Their masks are meaningless (random weights); these tests check layout, sizes and calibration only.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3VideoModel

from sam3_serve_core.checkpoint import load_sam3
from tests.conftest import random_image
from tools.tiny_checkpoint import PRESETS, TINY_MARKER_FILE, build_tiny_checkpoint

# facebook/sam3 (see /work/shared/notes/sam3-model.md): ~840M parameters, 446M of them the ViT.
REAL_PARAMS = 840e6
REAL_VIT_PARAMS = 446e6


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("mid"), preset="mid")


def test_cli_builds_the_same_bytes_twice(tmp_path):
    for name in ("first", "second"):
        subprocess.run(
            [sys.executable, "-m", "tools.tiny_checkpoint", str(tmp_path / name), "--size", "56"],
            check=True,
            capture_output=True,
        )
    digests = {
        name: hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
        for name in ("first", "second")
    }
    assert digests["first"] == digests["second"]
    marker = (tmp_path / "first" / TINY_MARKER_FILE).read_text()
    assert "meaningless" in marker.lower()
    assert json.loads(marker.splitlines()[-1]) == {"preset": "tiny", "image_size": 56, "seed": 0}


def test_layout_mirrors_facebook_sam3(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "sam3_video"
    assert config["tracker_config"]["model_type"] == "sam3_tracker_video"
    with safe_open(tiny_dir / "model.safetensors", "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}
        assert not any(key.startswith("tracker_model.vision_encoder.") for key in weights.keys())
    assert prefixes == {"detector_model", "tracker_model", "tracker_neck"}
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).exists()


def test_both_heads_load_with_nothing_missing(tiny_dir):
    for model_class in (Sam3Model, Sam3TrackerModel):
        _, info = model_class.from_pretrained(tiny_dir, output_loading_info=True)
        assert not info["missing_keys"], f"{model_class.__name__} missing {sorted(info['missing_keys'])[:5]}"
        assert not info["mismatched_keys"]


def test_resolution_is_a_parameter(tiny_dir):
    config = AutoConfig.from_pretrained(tiny_dir)
    size = config.detector_config.vision_config.image_size
    assert size in (56, 112)
    assert config.tracker_config.vision_config.image_size == size
    assert config.tracker_config.vision_config.backbone_feature_sizes[0] == [4 * size // 14] * 2
    assert Sam3Processor.from_pretrained(tiny_dir).image_processor.size["height"] == size


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [0, 50, 100])
def test_resolution_must_be_a_multiple_of_the_patch(preset, size):
    with pytest.raises(ValueError, match="multiple of 14"):
        PRESETS[preset](size)


def test_mid_preset_loads_with_nothing_missing(mid_dir):
    for model_class in (Sam3Model, Sam3TrackerModel):
        _, info = model_class.from_pretrained(mid_dir, output_loading_info=True)
        assert not info["missing_keys"], f"{model_class.__name__} missing {sorted(info['missing_keys'])[:5]}"
        assert not info["mismatched_keys"]
    assert load_sam3(str(mid_dir)).geometry.image_size == 504
    marker = (mid_dir / TINY_MARKER_FILE).read_text()
    assert "meaningless" in marker.lower() and json.loads(marker.splitlines()[-1])["preset"] == "mid"


@torch.inference_mode()
def test_mid_preset_cost_is_its_vit(mid_dir):
    """Most of a request's cost is the ViT's, as in the real model (its heads are as narrow as the video tracker
    allows: 128)."""
    model = Sam3Model.from_pretrained(mid_dir).eval()
    pixels = torch.zeros(1, 3, 504, 504)
    tokens = torch.ones(1, 32, dtype=torch.long)
    with FlopCounterMode(display=False) as vit:
        model.vision_encoder.backbone(pixels)
    with FlopCounterMode(display=False) as request:
        model(pixel_values=pixels, input_ids=tokens, attention_mask=tokens)
    assert vit.get_total_flops() > 0.7 * request.get_total_flops()


def test_full_preset_is_facebook_sam3():
    config = PRESETS["full"]()
    assert config.image_size == 1008
    assert config.tracker_config.vision_config.backbone_feature_sizes == [[288, 288], [144, 144], [72, 72]]
    with torch.device("meta"):
        model = Sam3VideoModel(config)
    total = sum(p.numel() for p in model.parameters())
    vit = sum(p.numel() for p in model.detector_model.vision_encoder.backbone.parameters())
    assert abs(total / REAL_PARAMS - 1) < 0.05, f"{total / 1e6:.0f}M parameters"
    assert abs(vit / REAL_VIT_PARAMS - 1) < 0.02, f"ViT {vit / 1e6:.0f}M parameters"


@torch.inference_mode()
def test_scores_straddle_the_threshold(tiny_dir):
    processor = Sam3Processor.from_pretrained(tiny_dir)
    model = Sam3Model.from_pretrained(tiny_dir).eval()
    inputs = processor(images=Image.fromarray(random_image(90, 130)), text="a red car", return_tensors="pt")
    outputs = model(**inputs)
    scores = (outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid())[0].numpy()
    assert (scores > 0.6).any() and (scores < 0.4).any()
    assert np.abs(scores - 0.5).min() > 1e-4, "no score so close to 0.5 that rounding could flip it"


def test_other_seed_gives_other_weights(tmp_path):
    build_tiny_checkpoint(tmp_path / "a", image_size=56, seed=0)
    build_tiny_checkpoint(tmp_path / "b", image_size=56, seed=1)
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as a, safe_open(tmp_path / "b" / "model.safetensors", "pt") as b:
        key = "detector_model.detr_decoder.query_embed.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))
