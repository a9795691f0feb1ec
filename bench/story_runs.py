"""Memory and time of long character sheets: a story split into runs of images_per_batch vs one batch.

On the tiny SDXL-architecture UNet (tests/clip_harness.py, real ComfyUI sampling, euler, cfg 5), for stories of 6, 12
and 24 scenes with anchors 2:
1. Peak memory of sampling (resident memory sampled every 2 ms in a fresh process per setting, above the memory
   with the model loaded and the story encoded): every run of a split story (images_per_batch 4) vs the whole
   story as one batch.
2. Time per image, split vs one batch, paired in one process (alternating, medians of repeats): the replay
   overhead costs compute, expected (images sampled over all runs) / scenes.

Run: .venv/bin/python bench/story_runs.py [--size 512] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SCENE_COUNTS = (6, 12, 24)
ANCHORS, IMAGES_PER_BATCH, SEED, CFG = 2, 4, 7, 5.0


def setup(size: int):
    from clip_harness import tiny_clip, tiny_model_for_clip
    from comfy_harness import boot_comfy, load_pack

    torch.set_num_threads(1)
    boot_comfy()
    load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return tiny_model_for_clip("sdxl"), tiny_clip("sdxl")


def story(clip, scenes: int, images_per_batch: int, size: int):
    from spectral_anchors.nodes.story_node import SpectralStoryPrompts

    lines = "\n".join(f"scene number {index} of the story" for index in range(scenes))
    return SpectralStoryPrompts.execute(clip, "a red fox in a blue scarf", "fox", lines, "a photo of {subject} {scene}",
                                        "blurry", size, size, False, ANCHORS, images_per_batch).result


def sampling(model, outputs, steps: int):
    """A function that samples every run of the story (the stock KSampler path), as a workflow would."""
    import nodes as comfy_nodes
    from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention

    positives, negatives, latents, the_story = outputs
    patched = SpectralAnchorAttention.execute(model, ANCHORS, "decoder", 0.01, 1.0, story=the_story).result[0]

    def run() -> None:
        for positive, negative, latent in zip(positives, negatives, latents, strict=True):
            comfy_nodes.common_ksampler(patched, SEED, steps, CFG, "euler", "normal", positive, negative, latent)

    return run


def probe(mode: str, scenes: int, size: int, steps: int) -> None:
    """Child-process entry: sample one story once and print its peak resident memory above the start (KiB)."""
    import psutil

    model, clip = setup(size)
    outputs = story(clip, scenes, IMAGES_PER_BATCH if mode == "split" else 0, size)
    run = sampling(model, outputs, steps)
    # No warm-up: freed memory stays in the process, so a warm-up would hide every batch smaller than its own.
    # The one-time costs of a first sampling are in every row alike.
    process = psutil.Process()
    base = process.memory_info().rss
    peak = base
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"extra_kib": (max(peak, process.memory_info().rss) - base) // 1024, "seconds": seconds}))


def probed(mode: str, scenes: int, size: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--probe", mode, str(scenes), "--size", str(size), "--steps", str(steps)]
    answer = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(answer.stdout.strip().splitlines()[-1])


def paired_times(size: int, steps: int, repeats: int) -> dict[int, tuple[float, float]]:
    """Median seconds per scene of (split, one batch) for each story length, alternating in this process."""
    model, clip = setup(size)
    result = {}
    for scenes in SCENE_COUNTS:
        split = sampling(model, story(clip, scenes, IMAGES_PER_BATCH, size), steps)
        one = sampling(model, story(clip, scenes, 0, size), steps)
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for fn, bucket in ((split, times[0]), (one, times[1])):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
        result[scenes] = (statistics.median(times[0]) / scenes, statistics.median(times[1]) / scenes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="paired timing repeats; 0 skips the paired timing")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "SCENES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], int(args.probe[1]), args.size, args.steps)
        return

    from comfy_harness import boot_comfy, load_pack

    boot_comfy()
    load_pack()
    from spectral_anchors.nodes.story import plan_runs

    print(f"tiny SDXL-architecture UNet, {args.size}x{args.size} px ({args.size // 8}x{args.size // 8} latent), "
          f"euler {args.steps} steps, cfg {CFG}, anchors {ANCHORS}, images_per_batch {IMAGES_PER_BATCH}, 1 thread")
    print("\npeak memory of sampling above the loaded model (fresh process per row)")
    print(f"{'scenes':>6} {'runs':>5} {'sampled':>8} {'replay':>7} | {'split MiB':>9} {'one batch MiB':>13} | "
          f"{'split s/scene':>13} {'one s/scene':>11} (unpaired)")
    memory = {}
    for scenes in SCENE_COUNTS:
        layout = plan_runs(scenes, ANCHORS, IMAGES_PER_BATCH)
        split_probe = probed("split", scenes, args.size, args.steps)
        one_probe = probed("one", scenes, args.size, args.steps)
        split, one = split_probe["extra_kib"] / 1024, one_probe["extra_kib"] / 1024
        memory[scenes] = (split, one)
        replay = layout.sampled_rows / scenes - 1
        print(f"{scenes:>6} {layout.run_count:>5} {layout.sampled_rows:>8} {replay:>6.0%} | {split:>9.1f} "
              f"{one:>13.1f} | {split_probe['seconds'] / scenes:>13.2f} {one_probe['seconds'] / scenes:>11.2f}")
    splits = [memory[s][0] for s in SCENE_COUNTS]
    ones = [memory[s][1] for s in SCENE_COUNTS]
    print(f"split: largest / smallest peak = {max(splits) / max(min(splits), 1e-9):.2f} (flat = 1.00); "
          f"one batch: 24 scenes / 6 scenes = {ones[-1] / max(ones[0], 1e-9):.2f}")

    if args.repeats <= 0:
        return
    print(f"\ntime per scene, paired in one process (median of {args.repeats})")
    print(f"{'scenes':>6} | {'split s':>8} {'one batch s':>11} {'ratio':>6} {'expected':>8}")
    for scenes, (split, one) in paired_times(args.size, args.steps, args.repeats).items():
        expected = plan_runs(scenes, ANCHORS, IMAGES_PER_BATCH).sampled_rows / scenes
        print(f"{scenes:>6} | {split:>8.3f} {one:>11.3f} {split / one:>6.2f} {expected:>8.2f}")


if __name__ == "__main__":
    main()
