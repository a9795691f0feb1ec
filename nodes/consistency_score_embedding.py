"""Image embeddings from a ComfyUI CLIP_VISION (comfy.clip_vision.ClipVisionModel), for the consistency score.

Any image encoder ComfyUI's CLIPVisionLoader loads works: CLIP ViT-L/H/bigG (the projected image embedding),
SigLIP (ComfyUI loads no pooling head, so its image_embeds are the last layer's token features: averaged over the
tokens here) and DINOv2 (the class token after the final norm, the usual DINO metric).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..attention.consistency import mask_images

# Images per encode_image call: bounds the encoder's activation memory on long sheets.
ENCODE_CHUNK = 16
# (model type, layers, width) of the encoders ComfyUI's loader knows, for the report.
_KNOWN = {
    ("clip_vision_model", 24, 1024): "CLIP ViT-L/14", ("clip_vision_model", 32, 1280): "CLIP ViT-H/14",
    ("clip_vision_model", 48, 1664): "CLIP ViT-bigG/14", ("siglip_vision_model", 27, 1152): "SigLIP so400m",
    ("dinov2", 24, 1024): "DINOv2 large", ("dinov2", 40, 1536): "DINOv2 giant",
}


class EncoderError(ValueError):
    """The CLIP_VISION input cannot encode images; the message says why, for the node to prefix."""


def check_image_encoder(clip_vision: object) -> None:
    if not callable(getattr(clip_vision, "encode_image", None)) or not hasattr(clip_vision, "model"):
        raise EncoderError(f"got {type(clip_vision).__name__}, which is not an image encoder. Connect the "
                           "CLIP_VISION output of Load CLIP Vision (a CLIP ViT-L/H/bigG, SigLIP or DINOv2 file from "
                           "models/clip_vision).")


def _model_type(clip_vision: object) -> str:
    model = clip_vision.model
    if hasattr(model, "vision_model"):
        return "siglip_vision_model" if getattr(clip_vision, "return_all_hidden_states", False) else "clip_vision_model"
    return "dinov2" if type(model).__name__.lower().startswith("dinov2") else type(model).__name__


def _layers_and_width(clip_vision: object) -> tuple[int | None, int | None]:
    model = clip_vision.model
    encoder = getattr(getattr(model, "vision_model", model), "encoder", None)
    layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    norm = getattr(getattr(model, "vision_model", None), "post_layernorm", None) or getattr(model, "layernorm", None)
    weight = getattr(norm, "weight", None)
    width = int(weight.shape[0]) if weight is not None else None
    return (len(layers) if layers is not None else None), width


def describe_encoder(clip_vision: object, embedding_width: int | None = None) -> str:
    """E.g. 'CLIP ViT-L/14 (clip_vision_model, 24 layers, width 1024, 224 px input), 768-d embeddings'."""
    model_type = _model_type(clip_vision)
    layers, width = _layers_and_width(clip_vision)
    name = _KNOWN.get((model_type, layers, width), "image encoder")
    size = getattr(clip_vision, "image_size", "?")
    text = f"{name} ({model_type}, {layers} layers, width {width}, {size} px input)"
    return text + (f", {embedding_width}-d embeddings" if embedding_width else "")


def encode_images(clip_vision: object, images: Tensor, masks: Sequence[Tensor] | None = None) -> Tensor:
    """[B, D] float32 embeddings of an IMAGE batch [B, H, W, C] (centre-cropped to the encoder's square input,
    as Load CLIP Vision's users know from CLIP Vision Encode), after blending each image's background to the
    encoder's mean colour where its mask (one [h, w] per image, any size) is 0 (attention/consistency.py
    mask_images)."""
    check_image_encoder(clip_vision)
    if masks is not None:
        fill = getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073])
        images = torch.cat([mask_images(images[row:row + 1], mask.unsqueeze(0), fill)
                            for row, mask in enumerate(masks)])
    chunks = []
    for start in range(0, images.shape[0], ENCODE_CHUNK):
        with torch.no_grad():
            output = clip_vision.encode_image(images[start:start + ENCODE_CHUNK], crop=True)
        try:
            embeds = output["image_embeds"]
        except (KeyError, AttributeError, TypeError) as error:
            raise EncoderError("this CLIP_VISION returned no image_embeds from encode_image; connect a CLIP, SigLIP "
                               "or DINOv2 model loaded by Load CLIP Vision.") from error
        if embeds.ndim == 3:  # a token sequence (SigLIP): average it into one vector per image
            embeds = embeds.mean(dim=1)
        chunks.append(embeds.detach().float().reshape(embeds.shape[0], -1).cpu())
    embeddings = torch.cat(chunks)
    if not torch.isfinite(embeddings).all():
        raise EncoderError("the encoder produced NaN or infinite embeddings (a broken or wrongly converted model "
                           "file?). Try another CLIP vision file.")
    return embeddings
