"""Cost of SpectralFeatureInjection, as ratios measured in one run (this machine is noisy).

1. Wall time (and the UNet forward count, a figure machine noise cannot blur) of a sampling with Spectral Anchor
   Attention + two-pass injection against attention alone, on the tiny SDXL-architecture UNet through comfy.sample
   (the stock KSampler path), next to the theoretical ratio: the first pass runs the UNet for steps 0..k (k = the
   feature step, timestep nearest 261), so 1 + (k + 1) / n, about 1 + 0.74 for ConsiStory's 50 steps. The
   single-pass variant is measured beside it.
2. The once-per-run extras of the two-pass mode: the correspondence computation (timed at the tiny model's shape,
   and optionally at SDXL 1024x1024's shape with --full-shape) and the feature memory (one map per image).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/injection_cost.py [--steps 20] [--repeats 5] [--full-shape]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

IMAGES, ANCHORS = 4, 2
LATENT = (4, 32, 48)  # tiny SDXL: the finest attention grid is 16x24
CONSISTORY_RATIO = 1.74  # docs/method.md section 2: the first pass runs until timestep 261 of 1000, ~74 % of the way
SDXL_FEATURES = (1280, 64, 64)  # DIFT map at 1024x1024: input of the first decoder block on the 64x64 grid


def interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time per label, the labels taking turns so machine noise hits them alike."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def count_forwards(patched, runner) -> int:
    """UNet forwards of one sampling (a counting DIFFUSION_MODEL wrapper on a clone): the noise-free cost figure."""
    from comfy.patcher_extension import WrappersMP

    counted = patched.clone()
    calls = [0]

    def count(executor, *args, **kwargs):
        calls[0] += 1
        return executor(*args, **kwargs)

    counted.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench.count", count)
    runner(counted)()
    return calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-shape", action="store_true", help="also time the correspondence at SDXL 1024 shape")
    args = parser.parse_args()

    from comfy_harness import boot_comfy, conditioning, load_pack, sample, tiny_model

    boot_comfy()
    load_pack()
    import comfy.samplers

    from spectral_anchors.attention.correspondence import dense_correspondence, smooth_features
    from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
    from spectral_anchors.nodes.feature_injection_node import SpectralFeatureInjection
    from spectral_anchors.nodes.feature_injection_passes import feature_step

    model = tiny_model("sdxl")
    shared = SpectralAnchorAttention.execute(model, ANCHORS, "decoder", 0.01, 1.0).result[0]

    def injected(source: str):
        return SpectralFeatureInjection.execute(shared, 0.8, 0.1, 0.333, "finest", ANCHORS, source).result[0]

    two_pass, single_pass = injected("two-pass"), injected("single-pass")
    positive, negative = conditioning("sdxl", IMAGES, 1), conditioning("sdxl", 1, 99)
    latent = torch.zeros(IMAGES, *LATENT)

    def runner(patched):
        return lambda: sample(patched, positive, negative, latent, steps=args.steps, cfg=5.0)

    medians = interleaved_medians({"attention only": runner(shared), "two-pass": runner(two_pass),
                                   "single-pass": runner(single_pass)}, args.repeats)
    forwards = {label: count_forwards(patched, runner) for label, patched in
                (("attention only", shared), ("two-pass", two_pass), ("single-pass", single_pass))}
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", args.steps).tolist()
    k = feature_step(model_sampling, sigmas, 261)
    theory = 1 + (k + 1) / args.steps

    print(f"tiny SDXL UNet, {IMAGES} images ({ANCHORS} anchors), latent {LATENT[1]}x{LATENT[2]}, "
          f"{args.steps} euler steps, cfg 5, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    base, base_forwards = medians["attention only"], forwards["attention only"]
    print(f"  attention only   {base:7.3f} s   1.00x   UNet forwards {base_forwards}")
    print(f"  two-pass         {medians['two-pass']:7.3f} s   {medians['two-pass'] / base:.2f}x   "
          f"UNet forwards {forwards['two-pass']} ({forwards['two-pass'] / base_forwards:.2f}x)   "
          f"theory {theory:.2f}x (feature step {k} of {args.steps}: 1 + {k + 1}/{args.steps}); "
          f"ConsiStory's ~{CONSISTORY_RATIO:.2f}x at 50 steps")
    print(f"  single-pass      {medians['single-pass']:7.3f} s   {medians['single-pass'] / base:.2f}x   "
          f"UNet forwards {forwards['single-pass']}   theory ~1.00x (+ one correspondence per injection step)")

    generator = torch.Generator().manual_seed(0)
    shapes = [("tiny SDXL", (IMAGES, 128, LATENT[1] // 2, LATENT[2] // 2))]
    if args.full_shape:
        shapes.append(("SDXL 1024x1024", (IMAGES, *SDXL_FEATURES)))
    for label, shape in shapes:
        features = torch.randn(shape, generator=generator)
        start = time.perf_counter()
        dense_correspondence(smooth_features(features), ANCHORS)
        elapsed = time.perf_counter() - start
        print(f"  correspondence once per run at {label} shape {tuple(shape)}: {elapsed:.3f} s")
    feature_bytes = IMAGES * SDXL_FEATURES[0] * SDXL_FEATURES[1] * SDXL_FEATURES[2] * 4
    print(f"  feature memory at SDXL 1024x1024: one float32 map per image, {IMAGES} x "
          f"{SDXL_FEATURES[0]}x{SDXL_FEATURES[1]}x{SDXL_FEATURES[2]} = {feature_bytes / 2**20:.0f} MiB, "
          "held from the feature step to the correspondence only")


if __name__ == "__main__":
    main()
