"""The toy model: a tiny SDXL-architecture UNet built from ComfyUI's own classes, v-prediction with
zero-terminal-SNR sampling (so the model cannot leave a per-image colour offset tied to the initial noise),
and the prompt vocabulary that conditions it through the UNet's real cross-attention.

Needs ComfyUI importable (tests/comfy_harness.boot_comfy()). Weights load with safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .world import SCENE_NAMES

TOY_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = TOY_DIR / "toy_sdxl_vpred_zsnr.safetensors"

CONTEXT_DIM = 64
CONTEXT_TOKENS = 8
VOCAB_SEED = 7
# Token ids. A prompt is [BOS, SUBJECT or PAD, SCENE, EOS, PAD, ...]: the subject word always sits at
# SUBJECT_TOKEN_INDEX, which is what a mask feature looks up in the cross-attention.
BOS, EOS, PAD, SUBJECT = 0, 1, 2, 3
FIRST_SCENE_TOKEN = 4
VOCAB_SIZE = FIRST_SCENE_TOKEN + len(SCENE_NAMES)
SUBJECT_TOKEN_INDEX = 1
SCENE_TOKEN_INDEX = 2

# SDXL-architecture UNet, three levels; self/cross-attention on the two coarser grids as in SDXL (where the
# 128x128 latent grid has no attention and the 64x64 and 32x32 grids do).
UNET_CONFIG = {
    "model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 1, 1],
    "context_dim": CONTEXT_DIM, "adm_in_channels": 2816, "use_temporal_attention": False,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "image_size": 32, "in_channels": 4, "out_channels": 4,
    "num_classes": "sequential", "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "use_temporal_resblock": False, "num_head_channels": 16,
}
# The size conditioning SDXL's encode_adm embeds; constant in this world (the pooled text vector is zero).
ADM_SIZE = 256


@dataclass(frozen=True)
class ToyConfig:
    """What a weights file was trained for (stored in its metadata)."""

    size: int
    model_channels: int

    def unet_config(self) -> dict:
        config = dict(UNET_CONFIG)
        config["model_channels"] = self.model_channels
        return config


def vocabulary() -> Tensor:
    """Fixed token embeddings [VOCAB_SIZE, CONTEXT_DIM] (seeded; also stored in the weights file)."""
    generator = torch.Generator().manual_seed(VOCAB_SEED)
    # Rounded through float16 so training uses exactly the embeddings the shipped file stores.
    return torch.randn(VOCAB_SIZE, CONTEXT_DIM, generator=generator).half().float()


def prompt_tokens(scene: int | None, subject: bool) -> list[int]:
    """Token ids of one prompt; scene None and subject False is the empty (unconditional) prompt."""
    tokens = [BOS, SUBJECT if subject else PAD, PAD if scene is None else FIRST_SCENE_TOKEN + scene, EOS]
    return tokens + [PAD] * (CONTEXT_TOKENS - len(tokens))


def context(vocab: Tensor, scenes: list[int | None], subjects: list[bool]) -> Tensor:
    """[B, CONTEXT_TOKENS, CONTEXT_DIM] cross-attention context for a batch of prompts."""
    ids = torch.tensor([prompt_tokens(scene, subject) for scene, subject in zip(scenes, subjects, strict=True)])
    return vocab[ids]


def empty_context(vocab: Tensor, batch: int) -> Tensor:
    return context(vocab, [None] * batch, [False] * batch)


def adm_extras(batch: int) -> dict:
    """The SDXL extras of a CONDITIONING: zero pooled vector, constant size conditioning."""
    return {"pooled_output": torch.zeros(batch, 1280), "width": ADM_SIZE, "height": ADM_SIZE, "crop_w": 0,
            "crop_h": 0, "target_width": ADM_SIZE, "target_height": ADM_SIZE}


def conditioning(vocab: Tensor, scenes: list[int | None], subjects: list[bool]) -> list:
    """A batched ComfyUI CONDITIONING: row b pairs with latent b."""
    batch = len(scenes)
    return [[context(vocab, scenes, subjects), adm_extras(batch)]]


def build_base_model(config: ToyConfig):
    """The ComfyUI BaseModel (SDXL class, V_PREDICTION, zero-terminal-SNR), weights uninitialised."""
    import comfy.latent_formats
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(config.unet_config())
    # The SDXL config forces its full-size head layout; tiny widths need their own.
    model_config.unet_config["num_head_channels"] = UNET_CONFIG["num_head_channels"]
    # The toy world is generated in model space: no latent scaling (SDXL's would be 0.13025).
    model_config.latent_format = comfy.latent_formats.LatentFormat()
    model_config.set_inference_dtype(torch.float32, None)
    # The same keys ComfyUI reads from a v-prediction, zero-terminal-SNR SDXL checkpoint.
    return model_config.get_model({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; seeded fan-in init, zeroed output layers (a stable start)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                fan_in = max(1, parameter[0].numel())
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
        # Residual branches start near identity: the last conv of each ResBlock and each transformer's proj_out.
        for name, submodule in module.named_modules():
            if name.endswith("out_layers.3") or name.endswith("proj_out"):
                for parameter in submodule.parameters():
                    parameter.mul_(0.1)


def save_weights(base_model, vocab: Tensor, config: ToyConfig, path: Path, extra_metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"diffusion_model.{k}": v.detach().to(torch.float16).contiguous()
               for k, v in base_model.diffusion_model.state_dict().items()}
    tensors["toy_world.vocabulary"] = vocab.to(torch.float16).contiguous()
    metadata = {"toy_config": json.dumps({"size": config.size, "model_channels": config.model_channels})}
    metadata.update({k: str(v) for k, v in extra_metadata.items()})
    save_file(tensors, str(path), metadata=metadata)


def load(path: Path = WEIGHTS_PATH):
    """(ModelPatcher, vocabulary, ToyConfig, metadata) from a shipped weights file (safetensors only)."""
    import comfy.model_patcher
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    raw = json.loads(metadata["toy_config"])
    config = ToyConfig(size=int(raw["size"]), model_channels=int(raw["model_channels"]))
    base_model = build_base_model(config)
    prefix = "diffusion_model."
    unet_state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    base_model.diffusion_model.load_state_dict(unet_state, strict=True)
    base_model.eval()
    vocab = tensors["toy_world.vocabulary"].float()
    patcher = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher, vocab, config, metadata
