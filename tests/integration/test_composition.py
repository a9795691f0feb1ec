"""The pack next to other nodes, with ComfyUI's own classes: ControlNet, LoRA, FreeU, PAG, SAG, Deep Shrink, an attn2
replacement (IPAdapter's mechanism) and KSamplerAdvanced's step split. README's compatibility list names these tests.

Each test checks both sides: the other node still acts (the images change by a clear margin), and so does the
pack (or, where both are defined exactly, the combination equals its reference).
"""

from __future__ import annotations

import logging

import comfy.sd
import nodes as comfy_nodes
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_harness import conditioning, sample, tiny_controlnet, tiny_model

from spectral_anchors.nodes.attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.sharing_patch import SharingPlan, apply_sharing

SMALL_LATENT = (8, 12)  # non-square; 8x12, 4x6, 2x3 token grids in the tiny SDXL UNet


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


def prompts(batch=3):
    return conditioning("sdxl", batch, 1), conditioning("sdxl", 1, 99)


def latent(batch=3, size=SMALL_LATENT):
    return torch.zeros(batch, 4, *size)


def share(model, **options):
    plan = dict(anchor_count=2, layers="decoder", start_percent=0.01, end_percent=1.0)
    return apply_sharing(model, SharingPlan(**{**plan, **options}))


def clearly_differs(a, b, fraction=1e-3):
    return bool((a - b).abs().max() > fraction * b.abs().max())


# ControlNet ---------------------------------------------------------------------------------------------------------


def with_controlnet(positive, negative, size=SMALL_LATENT, strength=1.0):
    hint = torch.rand(1, size[0] * 8, size[1] * 8, 3, generator=torch.Generator().manual_seed(4))
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, tiny_controlnet(), hint,
                                                                  strength, 0.0, 1.0)


class ControlSpy:
    """A DIFFUSION_MODEL wrapper inside the pack's: the residual lists each UNet forward receives, before it runs."""

    def __init__(self):
        self.received = []  # per UNet forward: {block name: residuals in the list}

    def install(self, model):
        spied = model.clone()

        def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
            self.received.append({name: len(value) for name, value in (control or {}).items()
                                  if isinstance(value, list)})
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

        spied.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.control_spy", spy)
        return spied


def test_controlnet_residuals_reach_every_forward_of_query_blending(sdxl):
    positive, negative = with_controlnet(*prompts())
    spy = ControlSpy()
    sample(spy.install(share(sdxl, query_blend=True)), positive, negative, latent(), steps=20)
    full = spy.received[0]
    assert full.get("output", 0) > 0 and full.get("middle", 0) > 0
    # Query blending runs two forwards on step 1 of 20 (step 0 is plain): 21 forwards, every one with all residuals.
    assert len(spy.received) == 21
    assert all(received == full for received in spy.received)


def test_controlnet_with_zero_blending_weight_equals_blending_off_bit_for_bit(sdxl):
    positive, negative = with_controlnet(*prompts())
    run = dict(steps=20)
    off = sample(share(sdxl), positive, negative, latent(), **run)
    zero = sample(share(sdxl, query_blend=True, query_blend_weights=(0.0, 0.0)), positive, negative, latent(), **run)
    assert torch.equal(zero, off)
    plain_prompts = prompts()
    assert clearly_differs(off, sample(share(sdxl), *plain_prompts, latent(), **run))  # the ControlNet acts
