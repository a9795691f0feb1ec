"""The pack next to other nodes, with ComfyUI's own classes: ControlNet, LoRA, FreeU, PAG, SAG, Deep Shrink, an attn2
replacement (IPAdapter's mechanism) and KSamplerAdvanced's step split. README's compatibility list names these tests.

Each test checks both sides: the other node still acts (the images change by a clear margin), and so does the
pack (or, where both are defined exactly, the combination equals its reference).
"""

from __future__ import annotations

import logging

import comfy.sd
import pytest
import torch
from comfy.patcher_extension import WrappersMP
from comfy_harness import conditioning, sample, tiny_controlnet, tiny_model

import nodes as comfy_nodes
from spectral_anchors.nodes.anchor_attention import SharingPlan, apply_sharing
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention

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


# Other nodes' self-attention replacements: core PAG (2-part key, its own pass), core SAG (3-part key) ---------


def share_node(model, layers="all", **options):
    return SpectralAnchorAttention.execute(model, 2, layers, 0.01, 1.0, **options).result[0]


class SelfAttentionCalls:
    """optimized_attention_override: which chunks (cond_or_uncond) each middle-block self-attention call served."""

    def __init__(self, context_tokens=77):
        self.context_tokens = context_tokens
        self.middle_chunks = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        block = options.get("block")
        if block is not None and block[0] == "middle" and k.shape[1] != self.context_tokens:
            self.middle_chunks.append(tuple(options.get("cond_or_uncond", ())))
        return func(q, k, v, *args, **kwargs)


def test_pag_after_sharing_every_layer_perturbs_its_own_pass(sdxl):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    positive, negative = prompts()
    shared = share_node(sdxl, layers="all")
    with_pag = PerturbedAttentionGuidance.execute(shared, 3.0).result[0]
    calls = SelfAttentionCalls()
    with_pag.model_options["transformer_options"]["optimized_attention_override"] = calls
    base = sample(shared, positive, negative, latent(), steps=4)
    guided = sample(with_pag, positive, negative, latent(), steps=4)
    assert clearly_differs(guided, base, 1e-2)
    # The CFG pass (both chunks) runs the middle block's self-attention; PAG's own pass (the cond chunk alone)
    # replaces it with its perturbed attention, which calls no attention at all.
    assert (1, 0) in calls.middle_chunks or (0, 1) in calls.middle_chunks
    assert (0,) not in calls.middle_chunks


def test_sag_before_or_after_sharing_every_layer_keeps_its_layer(sdxl, caplog):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    positive, negative = prompts()
    sag_after = SelfAttentionGuidance.execute(share_node(sdxl, layers="all"), 0.5, 2.0).result[0]
    with caplog.at_level(logging.WARNING):
        sag_before = share_node(SelfAttentionGuidance.execute(sdxl, 0.5, 2.0).result[0], layers="all")
    warnings = [record for record in caplog.records if "already replaces self-attention" in record.getMessage()]
    assert len(warnings) == 1 and "('middle', 0, 0)" in warnings[0].getMessage()
    after = sample(sag_after, positive, negative, latent(), steps=4)
    assert torch.equal(sample(sag_before, positive, negative, latent(), steps=4), after)
    assert clearly_differs(after, sample(share_node(sdxl, layers="all"), positive, negative, latent(), steps=4), 1e-2)


def test_a_two_part_replacement_already_on_the_model_keeps_its_block(sdxl, caplog):
    calls = []

    def other_nodes_attention(q, k, v, extra_options):
        calls.append(extra_options["block_index"])
        return v

    other = sdxl.clone()
    other.set_model_attn1_replace(other_nodes_attention, "output", 3)  # a 2-part key, as PAG uses
    with caplog.at_level(logging.WARNING):
        patched = share_node(other, layers="decoder")
    warnings = [record for record in caplog.records if "already replaces self-attention" in record.getMessage()]
    assert len(warnings) == 1 and "('output', 3, 0)" in warnings[0].getMessage()
    positive, negative = prompts()
    sample(patched, positive, negative, latent(), steps=2)
    assert calls  # its replacement still runs on its block
    replacements = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert replacements[("output", 3)] is other_nodes_attention


# Deep Shrink (core PatchModelAddDownscale) ---------------------------------------------------------------------------

DEEP_SHRINK_LATENT = (16, 24)  # coarsest grid 4x6; 2x3 (factor 2) or 3x4 (factor 1.5) inside the shrink window


def deep_shrink(model, factor):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    # Block 3 of the tiny UNet's encoder is its first attention block: everything below it shrinks.
    return PatchModelAddDownscale.execute(model, 3, factor, 0.0, 0.35, True, "bicubic", "bicubic").result[0]


def three_scenes():
    from spectral_anchors.nodes.story import Story

    return Story(prompts=("a", "b", "c"), subject_tokens=((2,), (5, 6), (7,)), subject_word="fox", width=192,
                 height=128, same_noise=False)


def injection(model, source):
    from spectral_anchors.nodes.feature_injection import InjectionSettings, apply_feature_injection

    return apply_feature_injection(model, InjectionSettings(source=source, anchor_count=2))


@pytest.mark.parametrize("factor", [2.0, 1.5])
def test_deep_shrink_with_subject_masks_and_feature_injection(sdxl, factor):
    positive, negative = prompts()
    run = dict(steps=10)
    size = DEEP_SHRINK_LATENT
    masked = dict(subject_masks=True, story=three_scenes(), mask_dropout=0.5)
    shrunk_sharing = share(deep_shrink(sdxl, factor), **masked)
    plain_sharing = sample(share(sdxl, **masked), positive, negative, latent(size=size), **run)
    with_masks = sample(shrunk_sharing, positive, negative, latent(size=size), **run)
    assert torch.isfinite(with_masks).all() and clearly_differs(with_masks, plain_sharing, 1e-2)
    # Deep Shrink after the pack's nodes, and injection (both correspondence sources) on top of the masks.
    for source in ("two-pass", "single-pass"):
        patched = deep_shrink(injection(share(sdxl, **masked), source), factor)
        out = sample(patched, positive, negative, latent(size=size), **run)
        assert torch.isfinite(out).all()
        assert clearly_differs(out, sample(deep_shrink(share(sdxl, **masked), factor), positive, negative,
                                           latent(size=size), **run), 1e-4)


# LoRA, FreeU, an attn2 replacement: patches that compose with sharing in either order --------------------------------


def tiny_lora(model, rank=4, seed=11):
    """A LoRA state dict (kohya key names) for the self-attention projections of the tiny UNet's decoder."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for lora_name, weight_key in key_map.items():
        if not (isinstance(weight_key, str) and lora_name.startswith("lora_unet_output_blocks")
                and ".attn1.to_" in weight_key):
            continue
        out_features, in_features = weights[weight_key].shape
        lora[f"{lora_name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.2
        lora[f"{lora_name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.2
        lora[f"{lora_name}.alpha"] = torch.tensor(float(rank))
    assert lora, "no decoder self-attention weights found for the LoRA"
    return lora


def with_lora(model, lora):
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched


def with_freeu(model):
    from comfy_extras.nodes_freelunch import FreeU_V2

    return FreeU_V2().patch(model, 1.1, 1.2, 0.6, 0.4)[0]


def with_cross_attention_replacement(model, calls):
    """IPAdapter's mechanism: an attn2 replacement on every cross-attention layer (3-part keys)."""
    import comfy.ldm.modules.attention as comfy_attention

    def extra_image_tokens(q, k, v, extra_options):
        calls.append(extra_options["block"])
        out = comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return out + 0.5 * comfy_attention.optimized_attention(q, k.flip(1), v.flip(1), extra_options["n_heads"])

    patched = model.clone()
    for key in share_layers(model, "all"):
        patched.set_model_attn2_replace(extra_image_tokens, *key)
    return patched


def share_layers(model, choice):
    from spectral_anchors.nodes.unet_layout import selected_layers

    return selected_layers(model.model.diffusion_model, choice)


@pytest.mark.parametrize("other", ["lora", "freeu", "attn2"])
def test_patches_compose_with_sharing_in_either_order(sdxl, other):
    calls = []
    apply = {
        "lora": lambda model: with_lora(model, tiny_lora(sdxl)),
        "freeu": with_freeu,
        "attn2": lambda model: with_cross_attention_replacement(model, calls),
    }[other]
    positive, negative = prompts()
    run = dict(steps=4)
    shared_first = sample(apply(share_node(sdxl, layers="all")), positive, negative, latent(), **run)
    other_first = sample(share_node(apply(sdxl), layers="all"), positive, negative, latent(), **run)
    assert torch.equal(shared_first, other_first)
    assert clearly_differs(shared_first, sample(share_node(sdxl, layers="all"), positive, negative, latent(), **run),
                           1e-2)  # the other node acts
    assert clearly_differs(shared_first, sample(apply(sdxl), positive, negative, latent(), **run), 1e-3)  # so do we
    if other == "attn2":
        assert calls


# KSamplerAdvanced's step split ---------------------------------------------------------------------------------------


def advanced(model, positive, negative, samples, start, end, add_noise, leftover, steps=10):
    return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, 5, steps, 5.0, "euler", "normal", positive,
                                                 negative, {"samples": samples}, start, end, leftover)[0]["samples"]


def test_a_step_split_of_ksampler_advanced_equals_one_run(sdxl):
    positive, negative = prompts()
    # Sharing from percent 0.01, single-pass injection in 0.1..0.333 (steps 1 and 2 of 10), the split at step 6.
    patched = injection(share(sdxl), "single-pass")
    whole = advanced(patched, positive, negative, latent(), 0, 10000, "enable", "disable")
    first = advanced(patched, positive, negative, latent(), 0, 6, "enable", "enable")
    split = advanced(patched, positive, negative, first, 6, 10000, "disable", "disable")
    assert torch.allclose(split, whole, rtol=1e-5, atol=1e-5 * whole.abs().max())
    assert clearly_differs(whole, advanced(share(sdxl), positive, negative, latent(), 0, 10000, "enable", "disable"),
                           1e-3)  # injection acts in the first part


# Percent windows: the shipped workflows keep ConsiStory's injection steps n/10 .. n/3 ---------------------------------


def test_shipped_workflows_inject_on_consistorys_steps(sdxl):
    import json
    import math
    from pathlib import Path

    import comfy.samplers

    from spectral_anchors.nodes.feature_injection_passes import injection_steps

    model_sampling = sdxl.get_model_object("model_sampling")  # the tiny UNet has SDXL's noise schedule
    checked = 0
    for path in sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json")):
        workflow_nodes = json.loads(path.read_text())["nodes"]
        samplers = [node for node in workflow_nodes if node["type"] == "KSampler"]
        for node in (node for node in workflow_nodes if node["type"] == "SpectralFeatureInjection"):
            _, start, end = node["widgets_values"][:3]
            _, _, steps, _, _, scheduler, _ = samplers[0]["widgets_values"]
            schedule = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).tolist()
            assert list(injection_steps(model_sampling, schedule, start, end)) == list(
                range(steps // 10, math.ceil(steps / 3))), path.name
            checked += 1
    assert checked >= 2
