"""Cost of anchor-shared self-attention, as ratios measured in one run (this machine is noisy).

1. Per-step time of the tiny SDXL-architecture UNet, patched vs unpatched, at two latent sizes.
2. One decoder self-attention layer at real SDXL 1024x1024 shapes, extended vs plain, next to the FLOP ratio.
3. Peak extra memory of that layer (resident memory sampled every 2 ms in a fresh process, extended minus plain).

Run: .venv/bin/python bench/sharing_speed.py [--threads N]   (default 1 thread: steadier ratios on a shared machine)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BATCH, ANCHORS, CHUNKS = 4, 2, 2  # four images, two anchors, cond + uncond
LAYER_SHAPES = [(4096, 640, 10), (1024, 1280, 20)]  # tokens, channels, heads of SDXL's two decoder grids


def flop_ratio(batch: int, anchors: int) -> float:
    """Score+value FLOPs of extended over plain attention: anchors see A*N keys, targets (A+1)*N, plain N."""
    return (anchors * anchors + (batch - anchors) * (anchors + 1)) / batch


def paired_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median times of two functions, run alternately so that load on this shared machine hits both alike."""
    first()
    second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def layer_inputs(tokens: int, channels: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(CHUNKS * BATCH, tokens, channels, generator=generator) for _ in range(3)]


def layer_run(mode: str, tokens: int, channels: int, heads: int):
    import comfy.ldm.modules.attention as comfy_attention

    from spectral_anchors.attention.sharing import shared_attention

    q, k, v = layer_inputs(tokens, channels)

    def attend(qq, kk, vv):
        return comfy_attention.optimized_attention(qq, kk, vv, heads)

    if mode == "plain":
        return lambda: attend(q, k, v)
    return lambda: shared_attention(q, k, v, CHUNKS, ANCHORS, attend)


def memory_probe(mode: str, tokens: int, channels: int, heads: int) -> None:
    """Child-process entry: run one layer once and print the peak resident memory above the start (KiB)."""
    import threading

    import psutil
    from comfy_harness import boot_comfy, load_pack

    torch.set_num_threads(1)
    boot_comfy()
    load_pack()
    run = layer_run(mode, tokens, channels, heads)
    process = psutil.Process()
    base = process.memory_info().rss
    peak = base
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    run()
    done.set()
    sampler.join()
    print(json.dumps({"base": base // 1024, "peak": max(peak, process.memory_info().rss) // 1024}))


def peak_extra_memory_mib(tokens: int, channels: int, heads: int) -> tuple[float, float]:
    peaks = {}
    for mode in ("plain", "extended"):
        output = subprocess.run([sys.executable, __file__, "--memory-probe", mode, str(tokens), str(channels),
                                 str(heads)], capture_output=True, text=True, check=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        peaks[mode] = (figures["peak"] - figures["base"]) / 1024
    return peaks["plain"], peaks["extended"]


def tiny_model_steps() -> None:
    from comfy_harness import conditioning, sample, tiny_model

    from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention

    model = tiny_model("sdxl")
    patched = SpectralAnchorAttention.execute(model, ANCHORS, "decoder", 0.0, 1.0).result[0]
    positive, negative = conditioning("sdxl", BATCH, 1), conditioning("sdxl", 1, 2)
    steps = 4
    print(f"tiny SDXL-architecture UNet, batch {BATCH}, {ANCHORS} anchors, cfg 5, {steps} Euler steps, decoder layers")
    for height, width in ((32, 32), (64, 64)):
        latent = torch.zeros(BATCH, 4, height, width)
        plain, shared = (t / steps for t in paired_medians(
            lambda x=latent: sample(model, positive, negative, x, steps=steps),
            lambda x=latent: sample(patched, positive, negative, x, steps=steps), 5))
        print(f"  latent {height}x{width}: {plain * 1e3:7.1f} ms/step plain, {shared * 1e3:7.1f} ms/step shared, "
              f"ratio {shared / plain:.2f}")


def sdxl_layers() -> None:
    import comfy.ldm.modules.attention as comfy_attention

    expected = flop_ratio(BATCH, ANCHORS)
    print(f"\none self-attention layer at SDXL 1024x1024 shapes, batch {BATCH} x {CHUNKS} chunks, {ANCHORS} anchors, "
          f"float32, kernel {comfy_attention.optimized_attention.__name__}")
    print(f"  FLOP ratio extended/plain: {expected:.2f}")
    for tokens, channels, heads in LAYER_SHAPES:
        plain, extended = paired_medians(layer_run("plain", tokens, channels, heads),
                                         layer_run("extended", tokens, channels, heads), 3)
        ratio = extended / plain
        plain_mib, extended_mib = peak_extra_memory_mib(tokens, channels, heads)
        print(f"  N={tokens} C={channels} heads={heads}: plain {plain * 1e3:7.0f} ms, "
              f"extended {extended * 1e3:7.0f} ms, "
              f"ratio {ratio:.2f} ({ratio / expected:.2f}x the FLOP ratio); peak memory of the call "
              f"{plain_mib:.0f} MiB plain, {extended_mib:.0f} MiB extended (+{extended_mib - plain_mib:.0f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        memory_probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
        torch.set_num_threads(threads)
        print(f"torch threads: {threads}")
        from comfy_harness import boot_comfy, load_pack

        boot_comfy()
        load_pack()
        tiny_model_steps()
        sdxl_layers()
