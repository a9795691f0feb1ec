"""Prompt alignment (CLIP-T): each image's embedding against its own prompt's, where the models allow it.

A text and an image embedding are comparable only when both towers were trained together into one projection
space. Among what ComfyUI's loaders give:
- SDXL's checkpoint (and the SDXL refiner's) carries CLIP-G: the text tower of OpenCLIP ViT-bigG/14 WITH its text
  projection, and SDXL's pooled output is that projected embedding (comfy/sdxl_clip.py: SDXLClipG,
  return_projected_pooled=True). Load CLIP Vision loads the same model's image tower (clip_vision_g.safetensors,
  comfy/clip_vision_config_g.json: projection_dim 1280). That pair is aligned: it is offered.
- CLIP-L, in SD1.x and SDXL checkpoints, is stored without its text projection (the checkpoint format keeps only
  the transformer; comfy/supported_models.py drops clip_l.transformer.text_projection.weight when saving, and
  comfy/sd.py silences it as missing when loading, so it stays unloaded). Its pooled output is therefore not in
  the space of CLIP ViT-L/14's image embeddings: refused.
- SigLIP and DINOv2 image towers have no text tower among these loaders: refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALIGNED_WIDTH = 1280  # OpenCLIP ViT-bigG/14's projection space


class AlignmentError(ValueError):
    """The connected CLIP cannot be compared with this image encoder; the message says why."""


def _projected_text_tower(clip: object) -> bool:
    import comfy.sdxl_clip

    model = getattr(clip, "cond_stage_model", None)
    return isinstance(model, (comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLRefinerClipModel))


def prompt_embeddings(clip: object, prompts: list[str], image_width: int) -> Tensor:
    """[len(prompts), D] projected text embeddings; raises AlignmentError when the pair is not aligned."""
    if not callable(getattr(clip, "tokenize", None)) or not callable(getattr(clip, "encode_from_tokens", None)):
        raise AlignmentError(f"got {type(clip).__name__}, not a CLIP text encoder. Connect the CLIP output of your "
                             "SDXL checkpoint loader.")
    if not _projected_text_tower(clip):
        raise AlignmentError(
            f"this CLIP ({type(getattr(clip, 'cond_stage_model', None)).__name__}) has no text projection that "
            "matches an image encoder: SD1.x and SDXL checkpoints store CLIP-L without its projection. Connect the "
            "CLIP of an SDXL checkpoint (its CLIP-G is projected) together with CLIP ViT-bigG vision "
            "(clip_vision_g.safetensors), or disconnect clip.")
    rows = []
    for prompt in prompts:
        _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        rows.append(pooled.float().reshape(1, -1).cpu())
    embeddings = torch.cat(rows)
    if embeddings.shape[1] != image_width:
        raise AlignmentError(
            f"the CLIP's projected text embeddings are {embeddings.shape[1]}-d but the image encoder's are "
            f"{image_width}-d, so they are not one space. SDXL's CLIP-G pairs with CLIP ViT-bigG vision "
            f"(clip_vision_g.safetensors, {ALIGNED_WIDTH}-d): load that in Load CLIP Vision, or disconnect clip.")
    return embeddings
