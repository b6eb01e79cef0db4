"""Track concepts, or clicked objects, through a video with transformers' own video models.

Two tasks on one checkpoint:
- *concepts*: `Sam3VideoModel` finds every instance of one or more texts on every frame and keeps each one's
  object id across frames; instances that enter later get new ids.
- *objects*: `Sam3TrackerVideoModel` follows the objects clicked (points with labels) or boxed on a frame,
  each under the id the caller gives it; later prompts on other frames correct them.

A `VideoSession` holds one video's frames, resized and normalised by the checkpoint's video processor as they
arrive (decoded frames are never kept), and transformers' inference session for its task, which it makes at
the first prompt: the task is the prompt's. Frames come from an uploaded file (`add_frame` per decoded frame)
or one by one from a live source (`track_new_frame`, the models' streaming mode). The models' own calls do
the work (`propagate_in_video_iterator`, `postprocess_outputs`, `post_process_masks`), so results are
transformers' results. Ray-free: a model replica holds the sessions (`video_sessions.VideoSessions`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import masks_to_boxes
from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor, Sam3VideoModel, Sam3VideoProcessor

from client import video_protocol as wire
from client.errors import InvalidPromptError, InvalidRequestError, VideoTooLongError
from client.rle import encode_masks
from sam3_serve_core.checkpoint import Sam3Models, from_pretrained
from sam3_serve_core.prompts import tokenize

logger = logging.getLogger(__name__)

CONCEPTS = "concepts"
OBJECTS = "objects"
STATE_WALK_EVERY = 16  # a session that grows by frames has its tracking state walked again at 1/16 more frames


@dataclass(frozen=True)
class TrackedObject:
    object_id: int
    mask: np.ndarray  # (H, W) bool, at the video's size
    box: tuple[float, float, float, float]  # xyxy pixels
    score: float
    prompt: str | None = None  # the text that found it (concepts)


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's objects, in ascending object id; an object whose mask is empty on the frame is left out."""

    frame_index: int
    objects: tuple[TrackedObject, ...]


@dataclass(frozen=True)
class ObjectPrompt:
    """One object for the tracker: points with labels (1 on it, 0 not on it), a box, or both, in pixels."""

    object_id: int
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    box: Sequence[float] | None = None


@dataclass
class VideoModels:
    concepts: Sam3VideoModel
    concept_processor: Sam3VideoProcessor
    objects: Sam3TrackerVideoModel
    object_processor: Sam3TrackerVideoProcessor
    text_max_tokens: int
    device: torch.device
    dtype: torch.dtype


def load_video_models(checkpoint: str, image_models: Sam3Models) -> VideoModels:
    """The checkpoint's video models, sharing the image models' detector and ViT.

    `Sam3VideoModel`'s detector is a `Sam3Model` with the same weights as the image path's, and the object
    tracker's ViT is the detector's: both are replaced by the image models' own, so what this adds to a replica
    is the video tracker (twice: one inside each video model) and its neck, not another ViT.
    """
    dtype, device = image_models.dtype, image_models.device
    concepts = from_pretrained(Sam3VideoModel, checkpoint, dtype=dtype)
    concepts.detector_model = image_models.detector
    objects = from_pretrained(Sam3TrackerVideoModel, checkpoint, dtype=dtype)
    objects.vision_encoder.backbone = image_models.detector.vision_encoder.backbone
    return VideoModels(
        concepts=concepts.to(device).eval(),
        concept_processor=from_pretrained(Sam3VideoProcessor, checkpoint),
        objects=objects.to(device).eval(),
        object_processor=from_pretrained(Sam3TrackerVideoProcessor, checkpoint),
        text_max_tokens=image_models.geometry.text_max_tokens,
        device=device,
        dtype=dtype,
    )


@dataclass
class VideoSession:
    """One video's processed frames and, once prompted, its task's inference session.

    `max_frames` bounds the frames it takes. Frames are stored on `storage_device` (the host by default: a GPU's
    memory is for the models and the tracking state; each frame moves to the device when it is used).
    """

    models: VideoModels
    max_frames: int
    storage_device: str = "cpu"
    height: int | None = None
    width: int | None = None
    task: str | None = None
    texts: tuple[str, ...] = ()
    frames: dict[int, torch.Tensor] = field(default_factory=dict)
    _inference: object | None = None
    _state_counted: tuple[int, int] | None = None  # (frames, bytes) of the tracking state when last walked

    @property
    def frame_count(self) -> int:
        return len(self.frames)

    def add_frame(self, rgb: np.ndarray) -> int:
        """Store one more (H, W, 3) uint8 RGB frame, processed as the video processor processes a video."""
        index = self.frame_count
        self.frames[index] = self._processed(rgb)
        return index

    def track_new_frame(self, rgb: np.ndarray) -> TrackedFrame:
        """Add a frame from a live source and track the session's prompts on it (the models' streaming mode).

        Before any prompt the frame is only stored: it has no objects yet, and a later propagation covers it.
        """
        if self.task is None:
            return TrackedFrame(self.add_frame(rgb), ())
        pixels = self._processed(rgb)
        if self.task == CONCEPTS:
            output = self.models.concepts(inference_session=self._inference, frame=pixels)
            return self._concept_frame(output)
        if not self._inference.obj_ids:
            raise InvalidPromptError("add objects to track (points or boxes on a frame) before streaming frames")
        return self._object_frame(self.models.objects(inference_session=self._inference, frame=pixels))

    def set_texts(self, texts: Sequence[str]) -> None:
        """Track every instance of `texts` (one concept or several): tracking starts again from no objects."""
        texts = tuple(texts)
        for text in texts:
            tokenize(self.models.concept_processor.tokenizer, text, self.models.text_max_tokens)
        self._start(CONCEPTS)
        self.models.concept_processor.add_text_prompt(self._inference, list(texts))
        self.texts = texts

    def add_objects(self, frame_index: int, objects: Sequence[ObjectPrompt]) -> TrackedFrame:
        """Prompt objects on a frame (new ones, or corrections of those tracked) and segment that frame.

        An object prompted again replaces its earlier prompt on that frame; later propagations follow it.
        """
        self._check_frame(frame_index)
        if not objects:
            raise InvalidPromptError("give at least one object: points with labels, or a box")
        if len({prompt.object_id for prompt in objects}) != len(objects):
            raise InvalidPromptError("each object may appear once per prompt")
        self._start(OBJECTS)
        # One object at a time: objects may differ in kind (points, a box) and in point count, and one call for
        # several pads their points, which changes what the model sees. A call marks only its own objects as
        # newly prompted, so all of them are marked once added, as one call for all would mark them.
        for prompt in objects:
            self.models.object_processor.add_inputs_to_inference_session(
                inference_session=self._inference, frame_idx=frame_index, **_object_inputs(prompt)
            )
        self._inference.obj_with_new_inputs = [prompt.object_id for prompt in objects]
        self._state_counted = None
        with torch.inference_mode():
            output = self.models.objects(inference_session=self._inference, frame_idx=frame_index)
        return self._object_frame(output)

    def propagate(
        self, start_frame: int | None = None, max_frames: int | None = None, reverse: bool = False
    ) -> tuple[int, Iterator[TrackedFrame]]:
        """How many frames tracking answers, and the tracking itself: one result per frame as it is computed.

        Concepts start at frame 0 by default, objects at the earliest frame they were prompted on. Forward, the
        start frame is the first answered; backward, concepts answer from the frame before it and objects from
        it (transformers' own counts), down to frame 0. `max_frames` bounds the frames answered.
        """
        if self.task is None:
            raise InvalidPromptError("prompt the session (a text, or objects on a frame) before tracking")
        if start_frame is not None:
            self._check_frame(start_frame)
        if max_frames is not None and max_frames < 1:
            raise InvalidRequestError(f"max_frames must be at least 1, got {max_frames}")
        start = start_frame if start_frame is not None else self._default_start()
        limit = max_frames if max_frames is not None else self.frame_count
        if reverse:
            available = start if self.task == CONCEPTS else (start + 1 if start > 0 else 0)
        else:
            available = self.frame_count - start
        total = min(limit, available)
        # transformers counts the frames after the start, except concepts backward, which start before it.
        after_start = total if reverse and self.task == CONCEPTS else total - 1
        if total == 0:
            return 0, iter(())
        self._state_counted = None
        model = self.models.concepts if self.task == CONCEPTS else self.models.objects
        outputs = model.propagate_in_video_iterator(
            self._inference, start_frame_idx=start, max_frame_num_to_track=after_start, reverse=reverse
        )
        to_frame = self._concept_frame if self.task == CONCEPTS else self._object_frame
        return total, (to_frame(output) for output in outputs)

    def _default_start(self) -> int:
        if self.task == CONCEPTS:
            return 0
        return min(frame for outputs in self._inference.output_dict_per_obj.values() for frame in outputs["cond_frame_outputs"])

    def nbytes(self) -> int:
        """The bytes of the tensors the session holds: its frames, and the tracking state and cached features.

        Frames all have one size, so theirs is a product. Walking the tracking state takes time in proportion to
        the frames tracked, so while the session only grows by frames (a live source), the state is walked again
        once it has a sixteenth more frames than at the last walk, and scaled by the frames in between: each
        frame adds about the same state. Prompting and tracking change the state otherwise: it is walked again.
        """
        if not self.frames:
            return 0
        frame_bytes = next(iter(self.frames.values())).untyped_storage().nbytes()
        return self.frame_count * frame_bytes + self._state_bytes()

    def _state_bytes(self) -> int:
        if self._inference is None:
            return 0
        if self._state_counted is None or self.frame_count * STATE_WALK_EVERY > self._state_counted[0] * (STATE_WALK_EVERY + 1):
            self._state_counted = (self.frame_count, _tensor_bytes(self._inference, skip=self.frames))
        counted_frames, counted_bytes = self._state_counted
        return counted_bytes * self.frame_count // counted_frames

    def _processed(self, rgb: np.ndarray) -> torch.Tensor:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InvalidRequestError(f"a frame must be (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        if self.height is None:
            self.height, self.width = height, width
        elif (height, width) != (self.height, self.width):
            raise InvalidRequestError(f"every frame of a video must be {self.width}x{self.height}; this one is {width}x{height}")
        if self.frame_count >= self.max_frames:
            raise VideoTooLongError(f"a video session holds at most {self.max_frames} frames")
        processed = self.models.concept_processor.video_processor(videos=rgb[np.newaxis], return_tensors="pt")
        return processed.pixel_values_videos[0, 0].to(self.storage_device, dtype=self.models.dtype)

    def _check_frame(self, frame_index: int) -> None:
        if not 0 <= frame_index < self.frame_count:
            raise InvalidRequestError(f"frame {frame_index} is not in the session, which holds frames 0 to {self.frame_count - 1}")

    def _start(self, task: str) -> None:
        """Make the task's inference session over the stored frames (again, for new texts)."""
        if self.task not in (None, task):
            raise InvalidPromptError(f"this session tracks {self.task}; start another session to track {task}")
        if self.frame_count == 0:
            raise InvalidRequestError("add a frame to the session before prompting it")
        if task == OBJECTS and self._inference is not None:
            return  # objects accumulate: a new prompt adds objects or corrects them
        processor = self.models.concept_processor if task == CONCEPTS else self.models.object_processor
        inference = processor.init_video_session(
            inference_device=self.models.device, video_storage_device=self.storage_device, dtype=self.models.dtype
        )
        inference.processed_frames = self.frames  # the same frames, not a copy: a streamed frame lands in both
        inference.video_height, inference.video_width = self.height, self.width
        self.task, self._inference, self._state_counted = task, inference, None

    @torch.inference_mode()
    def _concept_frame(self, output) -> TrackedFrame:
        result = self.models.concept_processor.postprocess_outputs(self._inference, output)
        prompt_of = {obj_id: text for text, obj_ids in result["prompt_to_obj_ids"].items() for obj_id in obj_ids}
        objects = tuple(
            TrackedObject(int(obj_id), mask, tuple(float(v) for v in box), float(score), prompt_of.get(int(obj_id)))
            for obj_id, mask, box, score in zip(
                result["object_ids"].tolist(), result["masks"].cpu().numpy(), result["boxes"].tolist(), result["scores"].tolist()
            )
        )
        return TrackedFrame(int(output.frame_idx), objects)

    @torch.inference_mode()
    def _object_frame(self, output) -> TrackedFrame:
        masks = self.models.object_processor.post_process_masks(
            [output.pred_masks], original_sizes=[[self.height, self.width]], binarize=True
        )[0][:, 0]
        scores = output.object_score_logits.float().sigmoid().flatten().tolist()
        visible = masks.flatten(1).any(dim=1)
        boxes = masks_to_boxes(masks[visible]).tolist() if bool(visible.any()) else []
        masks_on_host = masks[visible].cpu().numpy()
        kept = [(obj_id, score) for obj_id, score, shown in zip(output.object_ids, scores, visible.tolist()) if shown]
        objects = tuple(
            TrackedObject(int(obj_id), mask, tuple(float(v) for v in box), score)
            for (obj_id, score), mask, box in zip(kept, masks_on_host, boxes)
        )
        return TrackedFrame(int(output.frame_idx), tuple(sorted(objects, key=lambda tracked: tracked.object_id)))


def _object_inputs(prompt: ObjectPrompt) -> dict:
    """One object's prompt as transformers' tracker processor takes it (a batch of one frame, one object)."""
    inputs: dict = {"obj_ids": [prompt.object_id]}
    if prompt.points is not None:
        if prompt.labels is None or len(prompt.labels) != len(prompt.points):
            raise InvalidPromptError(f"object {prompt.object_id}: give one label per point")
        inputs["input_points"] = [[[list(map(float, point)) for point in prompt.points]]]
        inputs["input_labels"] = [[[int(label) for label in prompt.labels]]]
    if prompt.box is not None:
        inputs["input_boxes"] = [[list(map(float, prompt.box))]]
    if len(inputs) == 1:
        raise InvalidPromptError(f"object {prompt.object_id}: give points with labels, a box, or both")
    return inputs


def _tensor_bytes(root: object, skip: object = None) -> int:
    """The bytes of every tensor reachable from `root` through containers and plain objects, each storage once,
    except through `skip`."""
    seen_storages: set[int] = set()
    seen_objects: set[int] = {id(skip)}
    total = 0
    stack = [root]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if id(value) in seen_objects or isinstance(value, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            continue
        seen_objects.add(id(value))
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif hasattr(value, "__dict__"):
            stack.extend(vars(value).values())
    return total


def apply_prompt(session: VideoSession, request: wire.VideoPromptRequest) -> TrackedFrame | None:
    """A wire prompt on the session: texts (tracking starts again), or objects (their frame, segmented)."""
    if request.text is not None:
        session.set_texts(request.texts)
        return None
    prompts = [ObjectPrompt(each.object_id, each.points, each.labels, each.box) for each in request.objects]
    return session.add_objects(request.frame_index, prompts)


def to_wire(tracked: TrackedFrame) -> wire.TrackedFrame:
    """A frame's objects on the wire: each mask as COCO RLE."""
    masks = encode_masks(np.stack([obj.mask for obj in tracked.objects])) if tracked.objects else []
    return wire.TrackedFrame(
        frame_index=tracked.frame_index,
        objects=[
            wire.TrackedObject(object_id=obj.object_id, mask=mask, box=obj.box, score=obj.score, prompt=obj.prompt)
            for obj, mask in zip(tracked.objects, masks)
        ],
    )
