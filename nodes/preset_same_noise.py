"""Same initial noise for every image of a batch, as a wrapper on the MODEL clone (ConsiStory's "same latent").

Spectral Story Prompts gets the same effect through the latent's batch_index; a preset reaches only the MODEL, so
it copies the first image's noise to every row when sampling starts. With the story node's batch_index (same_noise
on, or a story split into runs) the first row is the seed's first draw, so both routes give identical noise.
"""

from __future__ import annotations

from comfy.patcher_extension import WrappersMP

from .run_context import SAME_NOISE_WRAPPER, PackPatcher


def _same_noise_outer_sample(executor, noise, *args, **kwargs):
    # All-zero noise means the sampler adds none (KSamplerAdvanced add_noise off, DisableNoise): keep it.
    if noise.shape[0] > 1 and bool(noise.any()):
        noise = noise[:1].expand_as(noise).clone()
    return executor(noise, *args, **kwargs)


def install_same_noise(model_patcher) -> None:
    """Every image of each sampling run on this clone starts from the first image's initial noise."""
    PackPatcher(model_patcher).install_wrapper(WrappersMP.OUTER_SAMPLE, SAME_NOISE_WRAPPER, _same_noise_outer_sample)
