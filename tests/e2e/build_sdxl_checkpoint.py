"""Build a full-size SDXL checkpoint with random weights, with ComfyUI's own classes, for end-to-end runs.

No real weights can be downloaded here, and ComfyUI's model detection rejects tiny configs, so the e2e test
needs a checkpoint of the real SDXL architecture: UNet 2.57 B + CLIP-L/G 0.82 B + VAE 84 M parameters, stored
in fp16 by comfy.sd.save_checkpoint. CheckpointLoaderSimple detects it as SDXL and every node of a real SDXL
workflow runs on it for real; its images are noise.

Cost (2 cores): about 40-90 s, a 6.6 GiB file, about 7.8 GB peak memory while building (the fp16 weights
plus one parameter's fp32 initialisation at a time; safetensors writes straight from the tensors). Loading
it in the server and sampling 128x128 then takes about 13 GB. The file goes to a cache folder outside the
tracked tree (.comfy-state/cache/, git-ignored) and is reused when present; it is written under a temporary
name and renamed, so an interrupted build never leaves a truncated file behind.

    .venv/bin/python tests/e2e/build_sdxl_checkpoint.py [--output PATH]   # prints the checkpoint's path
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = PACK_ROOT / ".comfy-state" / "cache" / "sdxl_random_fp16.safetensors"
SEED = 20240501
# The SDXL base UNet exactly as comfy/model_detection.py detects it from the real checkpoint.
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The SD/SDXL KL autoencoder, as comfy.sd.VAE builds it for a checkpoint's VAE.
SDXL_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build(output: Path) -> Path:
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    from comfy_harness import boot_comfy, init_weights

    boot_comfy()
    import comfy.ldm.models.autoencoder
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import torch

    torch.manual_seed(SEED)
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})  # ComfyUI's layers allocate without initialising: init_weights fills them
    init_weights(model.diffusion_model, SEED)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float16})
    init_weights(clip.cond_stage_model, SEED + 1)

    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SDXL_VAE), embed_dim=4)
    init_weights(autoencoder, SEED + 2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), dtype=torch.float16)
    del autoencoder

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + f".partial-{os.getpid()}")
    try:
        comfy.sd.save_checkpoint(str(partial), patcher, clip=clip, vae=vae,
                                 metadata={"spectral_anchors": "random-weight SDXL for end-to-end tests; not a model"})
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    arguments = parser.parse_args()
    if arguments.output.exists() and not arguments.force:
        print(arguments.output)
        return
    started = time.monotonic()
    path = build(arguments.output)
    print(f"built {path.stat().st_size / 2**30:.2f} GiB in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
