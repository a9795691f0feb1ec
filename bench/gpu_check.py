"""What the spectral filters cost on a GPU: per-layer times and one full SDXL UNet step, plain vs shared vs filtered.

    .venv/bin/python bench/gpu_check.py            # one CUDA GPU, float16, SDXL 1024x1024 shapes; < 3 minutes
    .venv/bin/python bench/gpu_check.py --smoke    # the same code on the CPU at tiny sizes (the test suite runs it)

Per layer (B=4 images per chunk, cond and uncond chunks, A=2 anchors), through ComfyUI's optimized_attention:
plain self-attention, extended (anchor-shared) attention, and extended + each chain of the character sheet
(K quantile 0.05; V log_squared -> energy 0.95; both), the filters called as the attention patch calls them (one
batched call per route, warm-started from the previous step's basis). Then one UNet step of a random-weight
SDXL UNet built in memory with ComfyUI's classes (full size: 1024x1024, batch 4, CFG), sampled through
comfy.sample: plain, shared, shared + both chains. Every figure is a median of paired repeats; ratios are
against plain. Nothing here needs editing to run on a GPU: the device is CUDA when there is one.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES, ANCHORS, CHUNKS = 4, 2, 2
# (tokens, channels, heads) of SDXL's self-attention at 1024x1024, and the smoke test's stand-ins.
FULL_LAYERS = ((4096, 640, 10), (1024, 1280, 20))
SMOKE_LAYERS = ((256, 64, 2), (64, 128, 4))
# The SDXL base UNet, defined once beside the checkpoint builder (a plain-Python module: no ComfyUI import).
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from build_sdxl_checkpoint import SDXL_UNET  # noqa: E402


def boot(device: torch.device) -> None:
    """Import ComfyUI (the pinned tree, or COMFYUI_PATH) for this device, and the pack as ComfyUI would."""
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_root import comfy_root

    root = comfy_root(prepare=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved = sys.argv
    sys.argv = [saved[0]] + ([] if device.type == "cuda" else ["--cpu"])
    try:
        import comfy.model_management  # noqa: F401  (reads the arguments at import)
        import utils.extra_config  # noqa: F401
        import utils.install_util  # noqa: F401

        import nodes  # noqa: F401
    finally:
        sys.argv = saved
    from comfy_harness import load_pack

    load_pack()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_medians(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, timed in turn repeat by repeat so load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():  # warm-up (kernels, allocator, caches)
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, medians: dict[str, float]) -> None:
    plain = medians["plain"]
    print(title)
    for name, seconds in medians.items():
        print(f"  {name:<34} {seconds * 1e3:9.2f} ms   x{seconds / plain:6.2f} of plain")


def spectra():
    from spectral_anchors.attention.spectrum import Reweight, Spectrum, Truncate

    return Spectrum((Truncate("quantile", 0.05),)), Spectrum((Reweight("log_squared"), Truncate("energy", 0.95)))


def layer_check(layers, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    for tokens, channels, heads in layers:
        one_layer(tokens, channels, heads, device, dtype, repeats)


def one_layer(tokens: int, channels: int, heads: int, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    import comfy.ldm.modules.attention as comfy_attention

    from spectral_anchors.attention.sharing import shared_attention
    from spectral_anchors.attention.spectrum import SolverState, filter_groups

    key_spectrum, value_spectrum = spectra()
    generator = torch.Generator(device=device).manual_seed(0)
    rows = CHUNKS * IMAGES
    # Projected keys/values have decaying spectra: a few strong directions over a weak floor.
    decay = torch.logspace(0, -2, channels, device=device)
    mixing = torch.linalg.qr(torch.randn(channels, channels, generator=generator, device=device)).Q

    def projected() -> torch.Tensor:
        raw = torch.randn(rows, tokens, channels, generator=generator, device=device) * decay
        return (raw @ mixing).to(dtype)

    q, k, v = projected(), projected(), projected()

    def attend(a, b, c):
        return comfy_attention.optimized_attention(a, b, c, heads)

    def filtered(key_filter, value_filter, state: SolverState):
        def pair(keys, values):
            return tuple(filter_groups([(key_filter, keys), (value_filter, values)], state=state, slot="layer"))

        def run():
            out = shared_attention(q, k, v, CHUNKS, ANCHORS, attend, pair_filter=pair)
            state.settle()  # the attention patch does this once per model call, not per layer
            return out

        run()  # the previous step: leaves the warm-start bases
        return run

    functions = {
        "plain": lambda: attend(q, k, v),
        "extended": lambda: shared_attention(q, k, v, CHUNKS, ANCHORS, attend),
        f"extended + K {key_spectrum!r}": filtered(key_spectrum, None, SolverState()),
        f"extended + V {value_spectrum!r}": filtered(None, value_spectrum, SolverState()),
        "extended + both (character sheet)": filtered(key_spectrum, value_spectrum, SolverState()),
    }
    with torch.inference_mode():
        medians = paired_medians(functions, repeats, device)
    print_table(f"layer T={tokens} C={channels} heads={heads}, B={IMAGES} x {CHUNKS} chunks, A={ANCHORS}, "
                f"{dtype}:", medians)


def unet_model(device: torch.device, dtype: torch.dtype, smoke: bool):
    """A random-weight SDXL UNet in a ModelPatcher, built with ComfyUI's classes (tiny for the smoke test)."""
    import comfy.model_patcher
    import comfy.supported_models

    if smoke:
        from comfy_harness import tiny_model

        return tiny_model("sdxl")
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    with torch.no_grad():  # ComfyUI's layers skip initialisation: small seeded values, drawn on the device
        generator = torch.Generator(device=device).manual_seed(0)
        for parameter in model.diffusion_model.parameters():
            fan_in = max(1, parameter[0].numel()) if parameter.ndim > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator, device=device) / math.sqrt(fan_in))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def unet_check(device: torch.device, dtype: torch.dtype, smoke: bool, repeats: int) -> None:
    import comfy.sample

    from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention

    model = unet_model(device, dtype, smoke)
    side = 32 if smoke else 128  # latent side: 256 or 1024 pixels
    context_dim, tokens = (64, 77) if smoke else (2048, 77)
    generator = torch.Generator().manual_seed(0)
    pixels = side * 8
    extras = {"width": pixels, "height": pixels, "crop_w": 0, "crop_h": 0, "target_width": pixels,
              "target_height": pixels}

    def cond(seed: int):
        local = torch.Generator().manual_seed(seed)
        return [[torch.randn(IMAGES, tokens, context_dim, generator=local),
                 {"pooled_output": torch.randn(IMAGES, 1280, generator=local), **extras}]]

    positive, negative = cond(1), cond(2)
    latent = torch.zeros(IMAGES, 4, side, side)
    noise = torch.randn(latent.shape, generator=generator)
    key_spectrum, value_spectrum = spectra()
    # start 0: every step shared (the node's default keeps the first step plain).
    shared = SpectralAnchorAttention.execute(model, ANCHORS, "decoder", 0.0, 1.0).result[0]
    both = SpectralAnchorAttention.execute(model, ANCHORS, "decoder", 0.0, 1.0, key_spectrum=key_spectrum,
                                           value_spectrum=value_spectrum).result[0]
    steps = 2  # the second step is warm-started, as every step after the first is in real sampling

    def step(patcher):
        def run():
            return comfy.sample.sample(patcher, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=0)
        return run

    with torch.inference_mode():
        medians = paired_medians({"plain": step(model), "extended": step(shared),
                                  "extended + both (character sheet)": step(both)}, repeats, device)
    medians = {name: seconds / steps for name, seconds in medians.items()}
    print_table(f"UNet step, {pixels}x{pixels}, batch {IMAGES}, CFG, {'tiny' if smoke else 'full-size'} "
                f"random-weight SDXL, {dtype} (per step, {steps}-step runs):", medians)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a tiny UNet on the CPU (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (median)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        parser.error("no CUDA GPU found; run with --smoke for the CPU check")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (1 if args.smoke else 5)
    boot(device)
    started = time.perf_counter()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    layer_check(SMOKE_LAYERS if args.smoke else FULL_LAYERS, device, dtype, repeats)
    unet_check(device, dtype, args.smoke, 1 if args.smoke else 2)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
