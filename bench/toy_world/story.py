"""One "story" on the toy model: a batch of scene prompts that all ask for the subject, sampled through the stock
KSampler path (comfy.sample.sample), and its metrics. Shared by bench/quality.py and tests/bench.

Layout: STORY_SIZE images, every scene once (order drawn from the seed), all prompting the subject; the first
ANCHORS are the anchors. Needs ComfyUI booted (tests/comfy_harness.boot_comfy()).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import model as toy_model
from .detector import Detector, story_metrics
from .world import SCENE_NAMES

ANCHORS = 2
STORY_SIZE = len(SCENE_NAMES)
# Sampler settings of every benchmark run (the toy model's own sweet spot, measured once; see the report).
SAMPLER = "euler"
SCHEDULER = "normal"
STEPS = 20
CFG = 3.0


def story_scenes(seed: int) -> list[int]:
    """The scene of each image of the story of this seed (each scene once, anchors first)."""
    return torch.randperm(STORY_SIZE, generator=torch.Generator().manual_seed(10_000 + seed)).tolist()


def sample_story(model_patcher, vocab: Tensor, size: int, seed: int, same_noise: bool = False, steps: int = STEPS,
                 cfg: float = CFG) -> Tensor:
    """The story's latents [STORY_SIZE, 4, size, size] sampled with model_patcher (patched or not)."""
    import comfy.sample

    scenes = story_scenes(seed)
    latent = torch.zeros(STORY_SIZE, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    if same_noise:
        noise = noise[:1].expand_as(noise).clone()
    positive = toy_model.conditioning(vocab, scenes, [True] * STORY_SIZE)
    negative = [[toy_model.empty_context(vocab, 1), toy_model.adm_extras(1)]]
    return comfy.sample.sample(model_patcher, noise, steps, cfg, SAMPLER, SCHEDULER, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def run_story(model_patcher, vocab: Tensor, detector: Detector, seed: int, same_noise: bool = False,
              steps: int = STEPS, cfg: float = CFG) -> dict[str, float]:
    latents = sample_story(model_patcher, vocab, detector.size, seed, same_noise=same_noise, steps=steps, cfg=cfg)
    return story_metrics(detector, latents, story_scenes(seed), ANCHORS)
