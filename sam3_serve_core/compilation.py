"""Regional compilation: `torch.compile` on the model's repeated transformer layers, not on the whole model.

Most of a batch's GPU time outside the matrix products is elementwise work between them (the ViT's rotary
embedding runs in float32 over every query and key, window partitions copy, residual adds): kernels that
Inductor fuses. Compiling one layer class rather than the whole model keeps the start short, because every
layer of a stack shares one compiled graph (parameters are graph inputs), and keeps the rest of the model,
with its data-dependent shapes (prompts, instances kept), eager. No CUDA graphs: batches run on several
threads at once, and the layers' batch dimension varies with every batch.

Compiled layers compute the same function with other kernels, so answers move within rounding of eager's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn

RegionName = Literal["vision", "detr_encoder", "detr_decoder"]

# Where each stack of repeated layers sits in `Sam3Model`.
REGIONS: dict[RegionName, str] = {
    "vision": "vision_encoder.backbone.layers",
    "detr_encoder": "detr_encoder.layers",
    "detr_decoder": "detr_decoder.layers",
}


# What `compile: true` compiles unless told otherwise: the ViT, where the batch's time is. On an H100 (bf16,
# batches of 8) compiling the detector's stacks as well added nothing measurable to throughput, and their
# warm-up passes for box prompts added about 25 s to a replica's start (benchmarks/RESULTS.md).
DEFAULT_REGIONS: tuple[RegionName, ...] = ("vision",)

# Stacks whose inputs carry the prompt (its tokens vary in number), so their graphs must see prompts of two lengths.
PROMPT_REGIONS: frozenset[RegionName] = frozenset({"detr_encoder", "detr_decoder"})


def compile_layers(detector: nn.Module, regions: tuple[str, ...] = tuple(REGIONS)) -> int:
    """Mark every layer of the named stacks for compilation on its first call; returns how many were marked.

    Compilation itself happens on the first forward passes (one graph per layer kind and batch shape class),
    so a replica warms up before it serves.
    """
    unknown = sorted(set(regions) - set(REGIONS))
    if unknown:
        raise ValueError(f"unknown compile regions {unknown}: choose from {sorted(REGIONS)}")
    marked = 0
    for region in regions:
        for layer in detector.get_submodule(REGIONS[region]):
            layer.compile()
            marked += 1
    return marked

