"""Reference images as anchors on a MODEL clone (METHOD.md section 5): two wrappers and nothing else.

The first R rows of the sampled batch are reference rows. At every model evaluation at noise level sigma:
- their input is the reference noised to sigma with the model's own noise scaling,
  model_sampling.noise_scaling(sigma, noise_r, z_r), one fixed noise per reference for the whole run;
- the model runs as usual, so their keys and values enter sharing like any anchor's (filters, masks included);
- their prediction (the denoised estimate) is replaced by z_r, so the sampler carries them to z_r unchanged.
z_r is the reference in the sampler's space: the VAE-encoded latent after the model's process_in (the latent
format's scaling), as the sampler's own input latent is.

Where: a PREDICT_NOISE wrapper, the guider's call that takes the sampler's x and sigma and returns the final
denoised estimate (after CFG and any post-CFG function). The input rows are replaced before anything else sees
them (ControlNets, every cond/uncond chunk, query blending's extra forward), and the output rows after everything
that could still change them, so denoised == z_r exactly for every model type and guider. The rows of x are the
rows of every chunk: ComfyUI builds each cond/uncond chunk from the whole x.

An OUTER_SAMPLE wrapper checks the run when sampling starts (the sharing plan is read then, so this node may sit
before or after Spectral Anchor Attention), prepares z_r and the noise, and keeps them in the sampling's
transformer_options for the duration of the run only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.utils
import torch
from comfy.patcher_extension import WrappersMP
from torch import Tensor

from .run_context import (
    REFERENCE_RUN_KEY,
    REFERENCE_WRAPPER,
    PackPatcher,
    holding,
    reference_run_of,
    sampling_options,
)
from .story_runs import tag_in_conds

NODE_NAME = "Spectral Reference Anchors"
MAX_REFERENCES = 8


def input_error(input_name: str, message: str) -> ValueError:
    return ValueError(f"{NODE_NAME}, input '{input_name}': {message}")


@dataclass(frozen=True)
class ReferenceSettings:
    """What the node asked for: the references as VAE Encode gave them, and the seed of their fixed noise."""

    samples: Tensor  # [R, C, H, W], the VAE's own (raw) latent space, float32 on the CPU
    noise_seed: int = 0

    @property
    def count(self) -> int:
        return int(self.samples.shape[0])


@dataclass
class ReferenceRun:
    """One sampling run's references in the sampler's space, with their fixed noise."""

    latents: Tensor  # z_r [R, C, H, W] after process_in
    noise: Tensor  # [R, C, H, W]
    model_sampling: object
    _placed: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])

    def on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """z_r and the noise on the device and in the dtype of the sampler's x (moved once per run)."""
        key = (like.device, like.dtype)
        if key not in self._placed:
            self._placed[key] = (self.latents.to(like), self.noise.to(like))
        return self._placed[key]


def reference_samples(reference, latent_channels: int, error=input_error,
                      expected: str = "this model works with") -> Tensor:
    """The reference LATENT's samples [R, C, H, W] as float32, or a clear error naming what is wrong.

    `error(input_name, message)` names the node asking (this one, or Spectral Story Prompts); `expected` says who
    needs `latent_channels` channels.
    """
    samples = reference.get("samples") if isinstance(reference, dict) else None
    if not isinstance(samples, Tensor):
        raise error("reference", "this is not a LATENT. Connect the LATENT output of a VAE Encode node that "
                                 "encodes your character's image(s).")
    if getattr(samples, "is_nested", False) or samples.ndim != 4:
        raise error("reference", f"a latent of shape {list(samples.shape)}; an image latent [images, channels, "
                                 "height, width] from VAE Encode is needed (video and audio latents are not "
                                 "supported).")
    count, channels = int(samples.shape[0]), int(samples.shape[1])
    if count == 0 or samples.shape[-1] == 0 or samples.shape[-2] == 0:
        raise error("reference", f"the latent is empty (shape {list(samples.shape)}). Connect VAE Encode of "
                                 "1 to 8 images of your character.")
    if count > MAX_REFERENCES:
        raise error("reference", f"{count} images; at most {MAX_REFERENCES} references are supported. Use the "
                                 "best 1-4 images of your character (Latent From Batch picks some).")
    if channels != latent_channels:
        raise error("reference", f"the latent has {channels} channels but {expected} "
                                 f"{latent_channels}-channel latents: it was encoded with another model's VAE "
                                 "(e.g. an SD3 or Flux VAE on SDXL). Encode the image with the VAE of the "
                                 "checkpoint you sample with.")
    samples = samples.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(samples).all():
        raise error("reference", "the latent contains NaN or infinite values; encode the image again.")
    if not samples.any():
        raise error("reference", "the latent is all zeros, which is what Empty Latent Image gives, not an "
                                 "encoded image. Connect Load Image -> VAE Encode with your character's image.")
    return samples


def check_counts(reference_count: int, model_patcher) -> None:
    """The references must be exactly the anchors of the sharing (or of feature injection without sharing)."""
    pack = PackPatcher(model_patcher)
    plan = pack.sharing_plan
    if plan is not None:
        anchors, owner = plan.anchor_count, "Spectral Anchor Attention's input 'anchors'"
    else:
        injection = pack.injection_settings
        if injection is None:
            return
        anchors, owner = injection.anchor_count, "Spectral Feature Injection's input 'anchors'"
    if anchors != reference_count:
        images = "image" if reference_count == 1 else "images"
        raise input_error("reference", f"{reference_count} reference {images}, but {owner} is {anchors}. The "
                                       "references are the anchors: set anchors to "
                                       f"{reference_count}, or give {anchors} reference image(s).")


def check_story_references(reference_count: int, conds: dict) -> None:
    """A Spectral Story Prompts run being sampled must have as many reference rows as this node has references."""
    tag = tag_in_conds(conds)
    if tag is None:
        return
    rows = tag.story.reference_count
    if rows != reference_count:
        story_side = f"{rows} reference row(s)" if rows else "no reference (its anchors are generated scenes)"
        raise input_error("reference", f"{reference_count} reference image(s), but the Spectral Story Prompts run "
                                       f"being sampled has {story_side}. Connect the same VAE Encode output to "
                                       "that node's reference input.")


def fit_to(samples: Tensor, height: int, width: int) -> Tensor:
    """The references at the sampling latent's size: scaled to cover it, then centre-cropped (bilinear)."""
    if tuple(samples.shape[-2:]) == (height, width):
        return samples
    return comfy.utils.common_upscale(samples, width, height, "bilinear", "center")


def apply_reference_anchors(model_patcher, settings: ReferenceSettings):
    """A clone of `model_patcher` whose first `settings.count` batch rows are the references."""
    patched = model_patcher.clone()
    pack = PackPatcher(patched)
    pack.set_reference_settings(settings)
    # One key: a later Spectral Reference Anchors node on the same model replaces an earlier one.
    pack.install_wrapper(WrappersMP.OUTER_SAMPLE, REFERENCE_WRAPPER, _make_sample_wrapper(settings))
    pack.install_wrapper(WrappersMP.PREDICT_NOISE, REFERENCE_WRAPPER, _predict_with_references)
    return patched


def _make_sample_wrapper(settings: ReferenceSettings):
    def sample_with_references(executor, noise, latent_image, *args, **kwargs):
        guider = executor.class_obj
        model_patcher = guider.model_patcher
        check_counts(settings.count, model_patcher)
        check_story_references(settings.count, getattr(guider, "conds", None) or {})
        if plan_missing(model_patcher):
            logging.warning("%s: no Spectral Anchor Attention shares on this model (or its sharing window is "
                            "empty), so the references are reproduced but nothing is shared with the other images.",
                            NODE_NAME)
        if noise.ndim != 4 or getattr(noise, "is_nested", False):
            raise input_error("model", f"the sampled latent has shape {list(noise.shape)}; references need an image "
                                       "latent [images, channels, height, width].")
        images, channels, height, width = (int(size) for size in noise.shape)
        if channels != settings.samples.shape[1]:
            raise input_error("reference", f"the references have {settings.samples.shape[1]} channels but the "
                                           f"sampled latent has {channels}. Encode them with the same VAE as the "
                                           "sampler's latent.")
        if images < settings.count:
            raise input_error("reference", f"{settings.count} references but the sampled batch holds only {images} "
                                           "image(s). The first rows of the batch are the references: make the "
                                           f"batch at least {settings.count} images (one per reference plus the "
                                           "scenes).")
        samples = settings.samples
        if tuple(samples.shape[-2:]) != (height, width):
            logging.info("%s: references of %dx%d latent pixels resized (centre crop) to the sampled %dx%d.",
                         NODE_NAME, samples.shape[-1], samples.shape[-2], width, height)
            samples = fit_to(samples, height, width)
        latents = model_patcher.model.process_latent_in(samples)
        generator = torch.Generator().manual_seed(settings.noise_seed)
        reference_noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        run = ReferenceRun(latents=latents, noise=reference_noise,
                           model_sampling=model_patcher.get_model_object("model_sampling"))
        with holding(sampling_options(guider), REFERENCE_RUN_KEY, run):
            return executor(noise, latent_image, *args, **kwargs)

    return sample_with_references


def plan_missing(model_patcher) -> bool:
    pack = PackPatcher(model_patcher)
    return pack.sharing_plan is None and pack.injection_settings is None


def _predict_with_references(executor, x, timestep, model_options=None, seed=None):
    run = reference_run_of((model_options or {}).get("transformer_options", {}))
    if run is None or x.shape[0] < run.count:
        return executor(x, timestep, model_options, seed)
    rows = run.count
    latents, noise = run.on(x)
    sigma = timestep if timestep.ndim == 0 else timestep[:rows]
    reference_input = run.model_sampling.noise_scaling(sigma, noise, latents)
    denoised = executor(torch.cat([reference_input.to(x.dtype), x[rows:]]), timestep, model_options, seed)
    return torch.cat([latents.to(denoised.dtype), denoised[rows:]])
