"""The model runner: one forward pass over a batch of prepared items, raw outputs per prompt.

A batch mixes images and prompt types. The ViT runs once per image whatever the number of prompts on
it; each distinct text runs once through the text encoder; concept prompts (text, box exemplars) go to
`Sam3Model` and point prompts to `Sam3TrackerModel`, both fed the shared backbone's features.

Prompts are grouped so that each group is one model call whose inputs need no padding that would change
the answer: text-only and box prompts apart (box prompts add geometry tokens), point prompts by point
count (a padded point is still a token to the tracker). Box counts within a group are padded the way
`Sam3Processor` pads them (label -10, masked out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from client.errors import ImageNotCachedError, ServiceUnavailableError
from sam3_serve_core.checkpoint import Sam3Models
from sam3_serve_core.masks import concept_scores
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.postprocess import ConceptOutput, PackedSegmentation, PointOutput, RawOutput, finish_segmentation
from sam3_serve_core.preprocess import normalize
from sam3_serve_core.prompts import ConceptPrompt, PointPrompt, Prompt, pad_box_exemplars
from sam3_serve_core.vision_cache import ImageFeatures, VisionFeatureCache

logger = logging.getLogger("ray.serve")

IMAGE_NOT_CACHED = "no replica holds this image's features any more: send the image again"


@dataclass(frozen=True)
class _PromptRef:
    item: int
    slot: int
    prompt: Prompt
    score_threshold: float


class Sam3Runner:
    """Runs prepared batches on the shared-ViT models and finishes each answer on the model's device.

    Nothing per query or per pixel leaves the device but the answer: kept instances, sorted, with their
    full-size masks bit-packed (`postprocess.finish_segmentation`). Text encodings are kept across batches
    (least recently used evicted): a service sees the same concepts again and again, and the text encoder
    is 354M parameters of the real model. With `vision_cache_bytes`, so are the vision features of images
    that carry an `image_key`.
    """

    def __init__(
        self,
        models: Sam3Models,
        score_threshold: float,
        text_cache_size: int = 1024,
        vision_cache_bytes: int = 0,
        mask_chunk_pixels: int = 16_000_000,
    ):
        self.models = models
        self.score_threshold = score_threshold
        self.mask_chunk_pixels = mask_chunk_pixels
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._text_cache_lock = threading.Lock()  # batches may run in several threads at once
        self.vision_cache = VisionFeatureCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        # Depends on the feature maps' shapes only, so one copy serves every cached image.
        self._position_encoding: tuple[torch.Tensor, ...] | None = None
        self.image_feature_bytes = 0  # what one image's cached features take, known after the first ViT pass

    @torch.inference_mode()
    def run(self, items: list[PreparedItem]) -> list[PackedSegmentation]:
        """One forward pass over the batch, then each item's answer finished on the device.

        Each item's `timings_ms["vision"]` is set to the time of the ViT pass that encoded its image (shared by
        the batch's images encoded together), or 0 when its features came from the cache: the answer shows
        whether a follow-up skipped the ViT.
        """
        outputs, vision_passes = self._forward(items)
        answers = [
            finish_segmentation(
                item_outputs,
                item.original_size,
                chunk_pixels=self.mask_chunk_pixels,
                max_instances=item.max_instances,
                with_instances=item.return_detections,
            )
            for item, item_outputs in zip(items, outputs)
        ]
        for item, vision_pass in zip(items, vision_passes):
            item.timings_ms["vision"] = 0.0 if vision_pass is None else vision_pass.elapsed_ms()
        return answers

    @torch.inference_mode()
    def forward(self, items: list[PreparedItem]) -> list[list[RawOutput]]:
        """Every prompt's raw outputs, on the model's device, by item and prompt."""
        return self._forward(items)[0]

    def _forward(self, items: list[PreparedItem]) -> tuple[list[list[RawOutput]], list[DeviceStopwatch | None]]:
        """The outputs, and per item the stopwatch of the ViT pass that encoded its image (None: cached)."""
        outputs: list[list[RawOutput | None]] = [[None] * len(item.prompts) for item in items]
        groups: dict[tuple, list[_PromptRef]] = defaultdict(list)
        for index, item in enumerate(items):
            for slot, prompt in enumerate(item.prompts):
                threshold = self.score_threshold if item.score_threshold is None else item.score_threshold
                groups[_group_key(prompt)].append(_PromptRef(index, slot, prompt, threshold))
        if not groups:
            return outputs, [None] * len(items)
        vision, vision_passes = self._vision_features(items)
        tracker_embeddings = None
        for key, refs in groups.items():
            if key[0] == "points":
                if tracker_embeddings is None:
                    tracker_embeddings = self._tracker_image_embeddings(vision.last_hidden_state)
                results = self._run_points(tracker_embeddings, refs)
            else:
                results = self._run_concepts(vision, refs)
            for ref, result in zip(refs, results):
                outputs[ref.item][ref.slot] = result
        return outputs, vision_passes

    def _device_tensor(self, array: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = torch.as_tensor(array)
        return tensor.to(device=self.models.device, dtype=dtype or tensor.dtype)

    def _vision_features(
        self, items: list[PreparedItem]
    ) -> tuple[Sam3VisionEncoderOutput, list[DeviceStopwatch | None]]:
        """The batch's backbone output: from the cache for images it holds, from one ViT pass for the rest;
        and per item, the stopwatch of that pass, or None for an image that came from the cache.

        Each distinct image is encoded once, however many items of the batch name it. What comes from the
        cache is the very tensor a miss computed, so an answer from the cache equals the answer without it.
        """
        vision_pass = DeviceStopwatch(self.models.device)
        if self.vision_cache is None:
            for item in items:
                self.check_image(item)
            with vision_pass:
                return self._encode([item.pixels for item in items]), [vision_pass] * len(items)
        sources: dict[str | int, int] = {}  # an image key, or the item's index when it has none -> image
        slots = [sources.setdefault(item.image_key or index, len(sources)) for index, item in enumerate(items)]
        carriers: dict[int, PreparedItem] = {}  # per image, an item that sent its pixels if any did
        for slot, item in zip(slots, items):
            if slot not in carriers or carriers[slot].pixels is None:
                carriers[slot] = item
        requests = Counter(slots)
        images: list[ImageFeatures | None] = [
            self.vision_cache.get(source, requests[slot]) if isinstance(source, str) else None
            for source, slot in sources.items()
        ]
        missing = [slot for slot, features in enumerate(images) if features is None]
        if missing:
            for slot in missing:
                if carriers[slot].pixels is None:  # evicted since `check_image` let it in
                    raise ImageNotCachedError(IMAGE_NOT_CACHED)
            with vision_pass:
                encoded = self._encode([carriers[slot].pixels for slot in missing])
            for row, slot in enumerate(missing):
                features = ImageFeatures(
                    fpn_hidden_states=tuple(level[row : row + 1].clone() for level in encoded.fpn_hidden_states),
                    last_hidden_state=encoded.last_hidden_state[row : row + 1].clone(),
                )
                images[slot] = features
                if carriers[slot].image_key is not None:
                    self.vision_cache.put(carriers[slot].image_key, features)
        per_item = [images[slot] for slot in slots]
        encoded_slots = set(missing)
        output = Sam3VisionEncoderOutput(
            last_hidden_state=torch.cat([features.last_hidden_state for features in per_item]),
            fpn_hidden_states=tuple(
                torch.cat(levels) for levels in zip(*(features.fpn_hidden_states for features in per_item))
            ),
            fpn_position_encoding=tuple(level.expand(len(items), *level.shape[1:]) for level in self._position_encoding),
        )
        return output, [vision_pass if slot in encoded_slots else None for slot in slots]

    def check_image(self, item: PreparedItem) -> None:
        """An item that names its image by id alone can only be answered where the image's features are."""
        if item.pixels is None and (self.vision_cache is None or item.image_key not in self.vision_cache):
            raise ImageNotCachedError(IMAGE_NOT_CACHED)

    def _encode(self, pixels: list[np.ndarray]) -> Sam3VisionEncoderOutput:
        """The ViT and the FPN neck over a stack of model-ready images."""
        stacked = torch.from_numpy(np.stack(pixels))
        if self.models.device.type == "cuda":
            # From page-locked memory the copy is a DMA that overlaps with other work on the GPU.
            stacked = stacked.pin_memory().to(self.models.device, non_blocking=True)
        encoded = self.models.detector.get_vision_features(normalize(stacked).to(self.models.dtype))
        if self._position_encoding is None:
            self._position_encoding = tuple(level[:1].clone() for level in encoded.fpn_position_encoding)
            self.image_feature_bytes = ImageFeatures(
                tuple(level[:1] for level in encoded.fpn_hidden_states), encoded.last_hidden_state[:1]
            ).nbytes
        return encoded

    def _tracker_image_embeddings(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
        """The tracker's image embeddings from the shared backbone output.

        Mirrors `Sam3TrackerModel.get_image_features` and the start of its `forward` after the backbone:
        the tracker's own neck, `conv_s0`/`conv_s1` on the two finest levels, `no_memory_embedding` on the
        last, and the reshape to `backbone_feature_sizes`.
        """
        tracker = self.models.tracker
        batch = last_hidden_state.shape[0]
        grid = self.models.geometry.image_size // tracker.config.vision_config.backbone_config.patch_size
        spatial = last_hidden_state.view(batch, grid, grid, -1).permute(0, 3, 1, 2)
        feature_maps, _ = tracker.vision_encoder.neck(spatial)
        feature_maps = list(feature_maps)
        feature_maps[0] = tracker.mask_decoder.conv_s0(feature_maps[0])
        feature_maps[1] = tracker.mask_decoder.conv_s1(feature_maps[1])
        feature_maps = [feature_map.flatten(2).permute(2, 0, 1) for feature_map in feature_maps]
        feature_maps[-1] = feature_maps[-1] + tracker.no_memory_embedding
        return [
            feature_map.permute(1, 2, 0).view(batch, -1, *size)
            for feature_map, size in zip(feature_maps, tracker.backbone_feature_sizes)
        ]

    def _run_concepts(self, vision: Sam3VisionEncoderOutput, refs: list[_PromptRef]) -> list[ConceptOutput]:
        prompts: list[ConceptPrompt] = [ref.prompt for ref in refs]
        images = self._device_tensor([ref.item for ref in refs])
        kwargs = {}
        if prompts[0].boxes_cxcywh is not None:
            boxes, labels = pad_box_exemplars(prompts)
            kwargs = {
                "input_boxes": self._device_tensor(boxes, self.models.dtype),
                "input_boxes_labels": self._device_tensor(labels),
            }
        text_embeds, attention_mask = self._text_features(prompts)
        result = self.models.detector(
            vision_embeds=Sam3VisionEncoderOutput(
                fpn_hidden_states=tuple(level[images] for level in vision.fpn_hidden_states),
                fpn_position_encoding=tuple(level[images] for level in vision.fpn_position_encoding),
            ),
            text_embeds=text_embeds,
            attention_mask=attention_mask,
            **kwargs,
        )
        scores = concept_scores(result.pred_logits.float(), result.presence_logits.float())
        boxes = result.pred_boxes.float()
        return [
            ConceptOutput(scores[row], boxes[row], result.pred_masks[row], ref.score_threshold)
            for row, ref in enumerate(refs)
        ]

    def _text_features(self, prompts: list[ConceptPrompt]) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """Each distinct text through the encoder once, and not at all when its encoding is cached."""
        keys = [prompt.text.input_ids.tobytes() + prompt.text.attention_mask.tobytes() for prompt in prompts]
        with self._text_cache_lock:
            embeddings = self._text_embeddings(prompts, keys)
        attention_mask = self._device_tensor(np.stack([prompt.text.attention_mask for prompt in prompts]))
        return BaseModelOutputWithPooling(pooler_output=torch.stack(embeddings)), attention_mask

    def _text_embeddings(self, prompts: list[ConceptPrompt], keys: list[bytes]) -> list[torch.Tensor]:
        missing = {key: prompt.text for key, prompt in zip(keys, prompts) if key not in self._text_cache}
        if missing:
            texts = list(missing.values())
            encoded = self.models.detector.get_text_features(
                input_ids=self._device_tensor(np.stack([text.input_ids for text in texts])),
                attention_mask=self._device_tensor(np.stack([text.attention_mask for text in texts])),
            )
            for key, row in zip(missing, encoded.pooler_output):
                self._text_cache[key] = row.clone()
        embeddings = []
        for key in keys:
            self._text_cache.move_to_end(key)
            embeddings.append(self._text_cache[key])
        while len(self._text_cache) > max(self.text_cache_size, len(set(keys))):
            self._text_cache.popitem(last=False)
        return embeddings

    def _run_points(self, embeddings: list[torch.Tensor], refs: list[_PromptRef]) -> list[PointOutput]:
        prompts: list[PointPrompt] = [ref.prompt for ref in refs]
        images = self._device_tensor([ref.item for ref in refs])
        single_point = prompts[0].points.shape[0] == 1
        result = self.models.tracker(
            image_embeddings=[level[images] for level in embeddings],
            input_points=self._device_tensor(np.stack([p.points for p in prompts])[:, None], self.models.dtype),
            input_labels=self._device_tensor(np.stack([p.labels for p in prompts])[:, None]),
            multimask_output=single_point,
        )
        iou = result.iou_scores[:, 0].float()
        best = iou.argmax(dim=-1) if single_point else torch.zeros(len(refs), dtype=torch.int64, device=iou.device)
        rows = torch.arange(len(refs), device=iou.device)
        masks = result.pred_masks[rows, 0, best]
        return [PointOutput(masks[row : row + 1], iou[row, best[row]]) for row in range(len(refs))]


class DeviceStopwatch:
    """How long the work queued on a device inside `with` took, read without stalling the device meanwhile:
    between two CUDA events on a GPU (read once the batch's answers are on the host, so the events have
    passed), by the clock on a CPU, where the work is done when `with` ends."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._started = self._ended = None

    def __enter__(self) -> DeviceStopwatch:
        self._started = self._mark()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ended = self._mark()

    def _mark(self) -> torch.cuda.Event | float:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self) -> float:
        if not self._cuda:
            return (self._ended - self._started) * 1000
        self._ended.synchronize()
        return self._started.elapsed_time(self._ended)


def _group_key(prompt: Prompt) -> tuple:
    if isinstance(prompt, PointPrompt):
        return ("points", prompt.points.shape[0])
    return ("concept", prompt.boxes_cxcywh is not None)


def run_isolating_failures(
    runner: Sam3Runner, items: list[PreparedItem], device: torch.device
) -> list[PackedSegmentation | Exception]:
    """One answer per item (Triton style): a batch that fails runs again item by item, so a bad item fails
    alone. Running out of memory on a single item is the replica's state, not the request's fault: a
    retryable error."""
    try:
        return runner.run(items)
    except Exception as error:
        if len(items) == 1:
            if isinstance(error, torch.OutOfMemoryError):
                release_cached_memory(device)
                return [ServiceUnavailableError("the model replica ran out of memory on this request: retry later")]
            return [error]
        logger.warning("batch of %d failed (%r): running its items one at a time", len(items), error)
        release_cached_memory(device)
    return [run_isolating_failures(runner, [item], device)[0] for item in items]


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
