"""The real ComfyUI as a library, the pack loaded as ComfyUI loads it, and tiny UNet models to sample with.

Nothing here mocks ComfyUI: models are ComfyUI's own classes with weights the harness initialises, and
sampling goes through comfy.sample, the path the stock KSampler takes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "spectral_anchors"


def boot_comfy() -> Path:
    """Make ComfyUI importable (CPU, no argument parsing surprises) and return its root."""
    sys.path.insert(0, str(PACK_ROOT / "scripts"))
    from comfy_root import comfy_root

    root = comfy_root(prepare=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--cpu"]
    try:
        import comfy.model_management  # noqa: F401  (reads the arguments at import)
        import utils.extra_config  # noqa: F401  (must precede nodes: nodes puts comfy/ first on sys.path)
        import utils.install_util  # noqa: F401

        import nodes  # noqa: F401
    finally:
        sys.argv = saved_argv
    return root


def load_pack():
    """Import the checkout as a package, the way ComfyUI imports a custom node folder (its __init__.py)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def init_weights(module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; give every parameter small, seeded values."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            elif "norm" in name and parameter.ndim == 1:
                parameter.copy_(1.0 + torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                fan_in = max(1, parameter[0].numel()) if parameter.ndim > 1 else parameter.numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)


TINY_SDXL = {
    "model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 1, 1], "context_dim": 64,
    "adm_in_channels": 2816, "use_temporal_attention": False, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "image_size": 32, "in_channels": 4, "out_channels": 4, "num_classes": "sequential", "use_spatial_transformer": True,
    "legacy": False, "use_checkpoint": False, "use_temporal_resblock": False, "num_head_channels": 16,
}
TINY_SD15 = {
    "model_channels": 32, "use_linear_in_transformer": False, "transformer_depth": [1, 1, 1, 0], "context_dim": 64,
    "adm_in_channels": None, "use_temporal_attention": False, "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0], "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False, "use_temporal_resblock": False,
    "num_heads": 2, "num_head_channels": -1,
}


def tiny_model(family: str = "sdxl", seed: int = 0):
    """A ModelPatcher around a tiny SDXL- or SD1.5-architecture UNet (about 4.5 M parameters)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if family == "sdxl":
        config = comfy.supported_models.SDXL(dict(TINY_SDXL))
    elif family == "sd15":
        config = comfy.supported_models.SD15(dict(TINY_SD15))
    else:
        raise ValueError(family)
    # The SDXL and SD1.5 configs force their full-size head layout; tiny widths need their own.
    config.unet_config.update({k: v for k, v in (TINY_SDXL if family == "sdxl" else TINY_SD15).items()
                               if k in ("num_head_channels", "num_heads")})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def conditioning(family: str, batch: int, seed: int = 0, tokens: int = 77):
    """A batched CONDITIONING: row b pairs with latent b (SDXL adds the pooled output)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, 64, generator=generator)
    extras = {}
    if family == "sdxl":
        extras = {"pooled_output": torch.randn(batch, 1280, generator=generator), "width": 256, "height": 256,
                  "crop_w": 0, "crop_h": 0, "target_width": 256, "target_height": 256}
    return [[context, extras]]


def sample(model, positive, negative, latent, seed: int = 0, steps: int = 3, cfg: float = 5.0,
           sampler: str = "euler", scheduler: str = "normal", noise=None, denoise: float = 1.0):
    """Sample through comfy.sample, the stock KSampler's path; returns the latent samples."""
    import comfy.sample

    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, disable_pbar=True, seed=seed)


def tiny_controlnet(seed: int = 3):
    """A ComfyUI ControlNet (comfy.cldm) shaped for the tiny SDXL UNet, with seeded weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import torch

    unet_only = ("transformer_depth_output", "use_temporal_attention", "use_temporal_resblock", "out_channels")
    config = {key: value for key, value in TINY_SDXL.items() if key not in unet_only}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               dtype=torch.float32, device=torch.device("cpu"), **config)
    init_weights(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"), manual_cast_dtype=None)


def with_hidden(node_class, hidden: dict):
    """node_class prepared as ComfyUI's executor prepares a V3 node, with these hidden inputs (io.Hidden keys).
    PREPARE_CLASS_CLONE took the hidden dict itself up to ComfyUI 0.3.x and takes {"hidden_inputs": ...} since."""
    import inspect

    parameter = next(iter(inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters))
    return node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if parameter == "v3_data" else hidden)


class RecordNode:
    """A test output node ("Record"): keeps every entry of what reaches it under its `key`, in RecordNode.seen."""

    seen: dict = {}
    RETURN_TYPES = ()
    FUNCTION = "record"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"value": ("*",), "key": ("STRING", {"default": ""})}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):  # noqa: N802
        return True

    def record(self, value, key):
        self.seen[key[0]] = list(value)
        return {}


class _SilentServer:
    """Where the executor sends its progress messages (nobody listens in a test)."""

    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass


def run_prompt(prompt: dict, prompt_id: str = "test"):
    """Execute an API prompt with ComfyUI's own PromptExecutor (no cache) up to its Record nodes; the executor."""
    import concurrent.futures

    import execution

    executor = execution.PromptExecutor(_SilentServer(), cache_type=False, cache_args={"lru": 0, "ram": 0})
    outputs = [node_id for node_id, node in prompt.items() if node["class_type"] == "Record"]
    # The executor calls asyncio.run: a worker thread keeps it clear of any event loop running on this one.
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        worker.submit(executor.execute, prompt, prompt_id, {}, outputs).result()
    return executor
