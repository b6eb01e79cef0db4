"""Video tracking equals transformers' own video pipeline on the tiny checkpoint, frame by frame.

The reference is what a transformers user runs on the frames: `Sam3VideoProcessor.init_video_session(video=...)`,
`add_text_prompt`, `Sam3VideoModel.propagate_in_video_iterator` and `postprocess_outputs` for concepts;
`Sam3TrackerVideoProcessor.add_inputs_to_inference_session`, a pass on the prompted frame,
`Sam3TrackerVideoModel.propagate_in_video_iterator` and `post_process_masks` for objects. Ours decodes a
lossless file of the same frames (`video_frames`), processes them one at a time into a `VideoSession` that
shares the image path's detector and ViT, and tracks through it. It is the same computation, so object ids,
masks and boxes are identical and scores equal. The tiny checkpoint's masks are meaningless (random
weights); only their agreement matters. For the tracker, an object whose mask is empty on a frame is left out
of that frame, on both sides.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor, Sam3VideoModel, Sam3VideoProcessor

from client.errors import InvalidPromptError, InvalidRequestError, VideoTooLongError
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core import video_tracking
from sam3_serve_core.video_frames import VideoLimits, video_frames
from sam3_serve_core.video_tracking import ObjectPrompt, TrackedFrame, VideoSession, load_video_models
from tests.videos import encode_video, moving_shapes

FRAMES = 6
LIMITS = VideoLimits(max_frames=100, max_frame_pixels=10**6)


@lru_cache(maxsize=None)
def video_models(checkpoint: str):
    return load_video_models(checkpoint, load_sam3(checkpoint))


@lru_cache(maxsize=None)
def reference_models(checkpoint: str):
    return (
        Sam3VideoProcessor.from_pretrained(checkpoint),
        Sam3VideoModel.from_pretrained(checkpoint).eval(),
        Sam3TrackerVideoProcessor.from_pretrained(checkpoint),
        Sam3TrackerVideoModel.from_pretrained(checkpoint).eval(),
    )


def frames() -> list[np.ndarray]:
    return moving_shapes(FRAMES)


def our_session(checkpoint: str) -> VideoSession:
    """A session of the frames as a client sends them: a lossless video file, decoded as a stream."""
    session = VideoSession(video_models(checkpoint), max_frames=LIMITS.max_frames)
    for rgb in video_frames(encode_video(frames(), container="matroska", codec="ffv1"), LIMITS):
        session.add_frame(rgb)
    return session


def as_tuples(tracked: TrackedFrame) -> dict:
    return {
        "frame": tracked.frame_index,
        "ids": [obj.object_id for obj in tracked.objects],
        "masks": np.stack([obj.mask for obj in tracked.objects]) if tracked.objects else np.zeros((0, 72, 96), bool),
        "boxes": np.array([obj.box for obj in tracked.objects], np.float32).reshape(-1, 4),
        "scores": np.array([obj.score for obj in tracked.objects], np.float32),
    }


def assert_tracks(propagation: tuple, reference: list[dict], frame_indices: list[int]) -> None:
    """A propagation's count and frames equal the reference's, which answers `frame_indices`."""
    total, tracked = propagation
    assert [frame["frame"] for frame in reference] == frame_indices
    assert total == len(frame_indices)
    assert_same_frames(list(tracked), reference)


def assert_same_frames(ours: list[TrackedFrame], reference: list[dict]) -> None:
    assert [tracked.frame_index for tracked in ours] == [frame["frame"] for frame in reference]
    for tracked, expected in zip(ours, reference):
        actual = as_tuples(tracked)
        assert actual["ids"] == expected["ids"], f"frame {expected['frame']}"
        np.testing.assert_array_equal(actual["masks"], expected["masks"])
        np.testing.assert_array_equal(actual["boxes"], expected["boxes"])
        np.testing.assert_array_equal(actual["scores"], expected["scores"])


@torch.inference_mode()
def reference_concepts(checkpoint: str, texts: list[str], **propagation) -> list[dict]:
    processor, model, _, _ = reference_models(checkpoint)
    session = processor.init_video_session(video=frames(), inference_device="cpu")
    processor.add_text_prompt(session, texts)
    results = []
    for output in model.propagate_in_video_iterator(session, **propagation):
        post = processor.postprocess_outputs(session, output)
        results.append(
            {
                "frame": output.frame_idx,
                "ids": post["object_ids"].tolist(),
                "masks": post["masks"].numpy(),
                "boxes": post["boxes"].numpy().astype(np.float32),
                "scores": post["scores"].numpy().astype(np.float32),
            }
        )
    return results


@torch.inference_mode()
def reference_objects(checkpoint: str, prompts: list[tuple[int, dict]], *propagations: dict) -> list[list[dict]]:
    """`prompts`: (frame, add_inputs_to_inference_session's keyword arguments), each followed by a pass on the
    frame, as transformers' docs prompt and correct; then each propagation in turn, on the same session (what
    one propagation tracks, the next remembers)."""
    _, _, processor, model = reference_models(checkpoint)
    session = processor.init_video_session(video=frames(), inference_device="cpu")
    for frame_index, inputs in prompts:
        # A copy of the ids: the session keeps the list it is given and empties it as the objects are segmented.
        inputs = {**inputs, "obj_ids": list(inputs["obj_ids"])}
        processor.add_inputs_to_inference_session(inference_session=session, frame_idx=frame_index, **inputs)
        model(inference_session=session, frame_idx=frame_index)
    return [_tracker_results(processor, model.propagate_in_video_iterator(session, **propagation)) for propagation in propagations or [{}]]


def _tracker_results(processor, outputs) -> list[dict]:
    results = []
    for output in outputs:
        masks = processor.post_process_masks([output.pred_masks], original_sizes=[[72, 96]], binarize=True)[0][:, 0]
        scores = output.object_score_logits.sigmoid().flatten()
        shown = masks.flatten(1).any(dim=1)
        ids = [obj_id for obj_id, keep in zip(output.object_ids, shown.tolist()) if keep]
        order = np.argsort(ids, kind="stable")
        boxes = torch.stack([_box(mask) for mask in masks[shown]]) if bool(shown.any()) else torch.zeros(0, 4)
        results.append(
            {
                "frame": output.frame_idx,
                "ids": [ids[i] for i in order],
                "masks": masks[shown].numpy()[order],
                "boxes": boxes.numpy().astype(np.float32)[order].reshape(-1, 4),
                "scores": scores[shown].numpy().astype(np.float32)[order],
            }
        )
    return results


def _box(mask: torch.Tensor) -> torch.Tensor:
    """A mask's xyxy box from its rows and columns, written out here rather than with torchvision's helper."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([cols.min(), rows.min(), cols.max(), rows.max()], dtype=torch.float32)


@pytest.mark.parametrize("texts", [["red square"], ["red square", "green disc"]], ids=["one_text", "two_texts"])
def test_concepts_match_transformers(tiny112_dir, texts):
    checkpoint = str(tiny112_dir)
    session = our_session(checkpoint)
    session.set_texts(texts)
    total, tracked = session.propagate()
    ours = list(tracked)
    reference = reference_concepts(checkpoint, texts)
    assert total == FRAMES
    assert len(ours) == FRAMES
    assert any(tracked.objects for tracked in ours), "the tiny checkpoint finds something to track"
    assert_same_frames(ours, reference)
    found = {obj.prompt for tracked in ours for obj in tracked.objects}
    assert found <= set(texts) and found


def test_concepts_from_a_later_frame_and_backward(tiny112_dir):
    checkpoint = str(tiny112_dir)
    session = our_session(checkpoint)
    session.set_texts(["red square"])
    assert_tracks(session.propagate(start_frame=2, max_frames=3), reference_concepts(checkpoint, ["red square"], start_frame_idx=2, max_frame_num_to_track=2), [2, 3, 4])
    session.set_texts(["red square"])  # new texts start tracking again
    assert_tracks(session.propagate(start_frame=4, reverse=True), reference_concepts(checkpoint, ["red square"], start_frame_idx=4, reverse=True), [3, 2, 1, 0])
    session.set_texts(["red square"])
    assert_tracks(session.propagate(start_frame=4, max_frames=2, reverse=True), reference_concepts(checkpoint, ["red square"], start_frame_idx=4, max_frame_num_to_track=2, reverse=True), [3, 2])


# Ours prompts one object at a time; transformers' one call for several pads their points to one count, so the
# reference's objects on a frame have the same kind of prompt and the same number of points.
TWO_CLICKS = [ObjectPrompt(1, points=[[20, 15], [5, 60]], labels=[1, 0]), ObjectPrompt(2, points=[[60, 26], [90, 5]], labels=[1, 0])]


def test_clicked_objects_match_transformers(tiny112_dir):
    checkpoint = str(tiny112_dir)
    session = our_session(checkpoint)
    first = session.add_objects(0, TWO_CLICKS)
    assert first.frame_index == 0 and [obj.object_id for obj in first.objects] == [1, 2]
    total, tracked = session.propagate()
    ours = list(tracked)
    assert total == FRAMES
    (reference,) = reference_objects(
        checkpoint,
        [(0, {"obj_ids": [1, 2], "input_points": [[[[20, 15], [5, 60]], [[60, 26], [90, 5]]]], "input_labels": [[[1, 0], [1, 0]]]})],
    )
    assert len(ours) == FRAMES and all(tracked.objects for tracked in ours)
    assert_same_frames(ours, reference)
    assert_same_frames([first], reference[:1])


def test_boxed_objects_a_correction_and_backward_match_transformers(tiny112_dir):
    checkpoint = str(tiny112_dir)
    session = our_session(checkpoint)
    session.add_objects(2, [ObjectPrompt(5, box=[5, 8, 40, 35]), ObjectPrompt(7, box=[45, 10, 90, 60])])
    session.add_objects(4, [ObjectPrompt(5, points=[[30, 20]], labels=[1], box=[10, 10, 45, 40])])
    prompts = [
        (2, {"obj_ids": [5, 7], "input_boxes": [[[5, 8, 40, 35], [45, 10, 90, 60]]]}),
        (4, {"obj_ids": [5], "input_points": [[[[30, 20]]]], "input_labels": [[[1]]], "input_boxes": [[[10, 10, 45, 40]]]}),
    ]
    forward, backward = reference_objects(checkpoint, prompts, {}, {"start_frame_idx": 4, "reverse": True})
    assert_tracks(session.propagate(), forward, [2, 3, 4, 5])  # from the first prompted frame
    assert_tracks(session.propagate(start_frame=4, reverse=True), backward, [4, 3, 2, 1, 0])
    assert session.propagate(start_frame=0, reverse=True)[0] == 0


def test_streamed_frames_track_as_they_arrive(tiny112_dir):
    """A live source: the first frame, the prompt, then one frame at a time through the streaming mode."""
    checkpoint = str(tiny112_dir)
    session = VideoSession(video_models(checkpoint), max_frames=LIMITS.max_frames)
    video = frames()
    assert session.track_new_frame(video[0]) == TrackedFrame(0, ())
    session.add_objects(0, TWO_CLICKS)
    streamed = [session.track_new_frame(rgb) for rgb in video[1:]]
    assert [tracked.frame_index for tracked in streamed] == list(range(1, FRAMES))
    assert all([obj.object_id for obj in tracked.objects] == [1, 2] for tracked in streamed)
    assert session.frame_count == FRAMES

    concepts = VideoSession(video_models(checkpoint), max_frames=LIMITS.max_frames)
    concepts.add_frame(video[0])
    concepts.set_texts(["red square"])
    assert [concepts.track_new_frame(rgb).frame_index for rgb in video[1:]] == list(range(1, FRAMES))


def test_a_session_refuses_what_it_cannot_track(tiny112_dir):
    models = video_models(str(tiny112_dir))
    session = VideoSession(models, max_frames=2)
    with pytest.raises(InvalidRequestError, match="add a frame"):
        session.set_texts(["cat"])
    video = frames()
    session.add_frame(video[0])
    with pytest.raises(InvalidRequestError, match="every frame"):
        session.add_frame(video[1][:40])
    session.add_frame(video[1])
    with pytest.raises(VideoTooLongError):
        session.add_frame(video[2])
    with pytest.raises(InvalidPromptError, match="before tracking"):
        session.propagate()
    with pytest.raises(InvalidRequestError, match="frame 2 is not in the session"):
        session.add_objects(2, TWO_CLICKS)
    with pytest.raises(InvalidPromptError, match="one label per point"):
        session.add_objects(0, [ObjectPrompt(1, points=[[1, 1]], labels=[])])
    session.add_objects(0, TWO_CLICKS)
    with pytest.raises(InvalidPromptError, match="tracks objects"):
        session.set_texts(["cat"])
    assert session.nbytes() > sum(frame.nbytes for frame in session.frames.values())


def test_a_live_session_counts_its_bytes_without_walking_its_state_each_frame(tiny112_dir, monkeypatch):
    """Frames pushed one by one scale the last walk of the tracking state, which is walked again only at a
    sixteenth more frames: the count stays within that of the exact walk, and tracking makes it exact again."""
    session = VideoSession(video_models(str(tiny112_dir)), max_frames=LIMITS.max_frames)
    video = moving_shapes(64)
    session.add_frame(video[0])
    session.add_objects(0, TWO_CLICKS)
    walks = []
    walk = video_tracking._tensor_bytes
    monkeypatch.setattr(video_tracking, "_tensor_bytes", lambda *args, **kwargs: walks.append(1) or walk(*args, **kwargs))
    for index, rgb in enumerate(video[1:], start=2):
        session.track_new_frame(rgb)
        counted = session.nbytes()
        exact = walk([session.frames, session._inference])
        assert abs(counted - exact) <= exact / video_tracking.STATE_WALK_EVERY, f"after {index} frames"
        if index == 32:
            walks.clear()
    assert len(walks) <= 32 // 3, f"{len(walks)} walks of the state for frames 33 to 64"
    total, tracked = session.propagate()
    assert total == 64 and len(list(tracked)) == 64
    assert session.nbytes() == walk([session.frames, session._inference])
