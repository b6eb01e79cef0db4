"""Image preparation exactly as `Sam3ImageProcessor` does it: resize on uint8, then normalize.

The resize runs on the CPU preprocessor; the normalize runs next to the model, so what travels between
them is the resized uint8 image (a quarter of the float32 size).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_to_model(rgb: np.ndarray, model_size: int) -> np.ndarray:
    """(H, W, 3) uint8 to (3, S, S) uint8: bilinear with antialias on the uint8 tensor, aspect not kept.

    This is the call `Sam3ImageProcessor` makes on CPU; an image already at the model size is not resized.
    """
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    if chw.shape[-2:] == (model_size, model_size):
        return chw.numpy()
    resized = F.interpolate(
        chw.unsqueeze(0), size=(model_size, model_size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].numpy()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [-1, 1]: `Sam3ImageProcessor`'s fused rescale (1/255), mean 0.5, std 0.5."""
    return (pixels.to(torch.float32) - 127.5) / 127.5
