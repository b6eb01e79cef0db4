"""The marker of the project's random-weight checkpoints, readable without torch (the ingress reads it)."""

from __future__ import annotations

from pathlib import Path

# Its presence marks a random-weight checkpoint, so that whatever loads one can say its masks are meaningless.
TINY_MARKER_FILE = "TINY_CHECKPOINT_README.txt"


def is_tiny_checkpoint(checkpoint: str) -> bool:
    """Whether `checkpoint` is the project's tiny random-weight test checkpoint (masks meaningless)."""
    return (Path(checkpoint) / TINY_MARKER_FILE).is_file()
