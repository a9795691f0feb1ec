"""Real ComfyUI CLIP objects with tiny random text encoders, and tiny UNets whose widths fit them.

The CLIP is comfy.sd.CLIP built from ComfyUI's own target classes (SD1Tokenizer / SD1ClipModel,
SDXLTokenizer / SDXLClipModel) and the tokenizer vocabulary ComfyUI ships in comfy/sd1_tokenizer. Only the
text encoders' widths and depths are shrunk, through the "<clip>_model_config" overrides that
comfy.sd1_clip.SDClipModel reads from model_options, so tokenizing and encoding run ComfyUI's real code.
"""

from __future__ import annotations

from comfy_harness import TINY_SDXL, init_weights, tiny_model

# Depth 3 is the minimum: SDXL reads the penultimate layer and ComfyUI asserts |layer_idx| < depth.
_TINY_TEXT_ENCODER = {"num_hidden_layers": 3, "num_attention_heads": 2}
# SD1.5: one CLIP-L of width 64 feeds the tiny SD1.5 UNet's context_dim of 64 directly.
SD15_CLIP_WIDTH = 64
# SDXL: CLIP-L and CLIP-G outputs are concatenated (32 + 32 = 64 = the tiny UNet's context_dim); the pooled
# output is CLIP-G's width (32), so the SDXL UNet's ADM input is 32 + 6 x 256 size embeddings.
SDXL_CLIP_L_WIDTH = 32
SDXL_CLIP_G_WIDTH = 32


def _encoder_config(width: int) -> dict:
    return {**_TINY_TEXT_ENCODER, "hidden_size": width, "intermediate_size": 2 * width}


def tiny_clip(family: str = "sdxl", seed: int = 0):
    """A comfy.sd.CLIP for SD1.5 ("sd15") or SDXL ("sdxl") with tiny text encoders and seeded random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    if family == "sd15":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        model_options = {"clip_l_model_config": _encoder_config(SD15_CLIP_WIDTH)}
    elif family == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        model_options = {"clip_l_model_config": _encoder_config(SDXL_CLIP_L_WIDTH),
                         "clip_g_model_config": _encoder_config(SDXL_CLIP_G_WIDTH)}
    else:
        raise ValueError(family)
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, tokenizer_data={}, model_options=model_options)
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_model_for_clip(family: str = "sdxl", seed: int = 0):
    """A tiny UNet (comfy_harness.tiny_model's architecture) whose cross-attention and ADM widths fit tiny_clip."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if family == "sd15":
        return tiny_model("sd15", seed)  # context_dim 64 = SD15_CLIP_WIDTH, no ADM
    if family != "sdxl":
        raise ValueError(family)
    unet = dict(TINY_SDXL, context_dim=SDXL_CLIP_L_WIDTH + SDXL_CLIP_G_WIDTH,
                adm_in_channels=SDXL_CLIP_G_WIDTH + 6 * 256)
    config = comfy.supported_models.SDXL(dict(unet))
    config.unet_config["num_head_channels"] = unet["num_head_channels"]  # the SDXL config forces 64
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def encode_alone(clip, text: str, **size) -> list:
    """What ComfyUI's CLIPTextEncode (or CLIPTextEncodeSDXL, given the size keys) returns for one prompt."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens, add_dict=dict(size))
