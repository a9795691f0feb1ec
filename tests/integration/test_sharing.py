"""SpectralAnchorAttention on the real ComfyUI: tiny SDXL / SD1.5 UNets sampled through comfy.sample."""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch
from comfy_harness import conditioning, sample, tiny_model
from reference import reference_shared_attention

from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.unet_layout import selected_layers

LATENT = (4, 16, 24)  # non-square on purpose: 16x24, 8x12, 4x6 token grids


def patch(model, anchors=2, layers="decoder", start=0.01, end=1.0, **spectra):
    return SpectralAnchorAttention.execute(model, anchors, layers, start, end, **spectra).result[0]


def reference_patch(model, anchors=2, layers="decoder"):
    """The same layers patched with the naive reference, sharing on every step but the first."""
    patched = model.clone()
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)

    def naive(q, k, v, extra):
        def attend(qq, kk, vv):
            return comfy_attention.optimized_attention(qq, kk, vv, extra["n_heads"], transformer_options=extra)

        if float(extra["sigmas"].max()) >= sigma_max * 0.9999:
            return attend(q, k, v)
        return reference_shared_attention(q, k, v, extra["cond_or_uncond"], anchors, attend)

    for key in selected_layers(model.model.diffusion_model, layers):
        patched.set_model_attn1_replace(naive, *key)
    return patched


def batch(family, size, seed=1, tokens=77):
    return conditioning(family, size, seed, tokens), conditioning(family, 1, 99, tokens)


def latent(size):
    return torch.zeros(size, *LATENT)


def test_empty_window_is_bit_identical_to_vanilla(model, family):
    positive, negative = batch(family, 4)
    vanilla = sample(model, positive, negative, latent(4))
    for start, end in ((0.5, 0.5), (0.8, 0.2)):
        assert torch.equal(sample(patch(model, start=start, end=end), positive, negative, latent(4)), vanilla)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_matches_the_reference_definition(model, family, cfg):
    positive, negative = batch(family, 4)
    ours = sample(patch(model), positive, negative, latent(4), cfg=cfg)
    reference = sample(reference_patch(model), positive, negative, latent(4), cfg=cfg)
    vanilla = sample(model, positive, negative, latent(4), cfg=cfg)
    # The two differ only in how attention calls are batched: float32 rounding, far below the change sharing makes.
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
    assert (ours - vanilla).abs().max() > 1000 * (ours - reference).abs().max()


def test_cond_and_uncond_in_separate_forwards(model, family):
    # 77 against 78 tokens cannot be concatenated, so ComfyUI runs cond and uncond as separate forwards.
    positive = conditioning(family, 4, 1, tokens=77)
    negative = conditioning(family, 1, 99, tokens=78)
    ours = sample(patch(model), positive, negative, latent(4))
    reference = sample(reference_patch(model), positive, negative, latent(4))
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())


def test_anchors_do_not_depend_on_targets(model, family):
    positive, negative = batch(family, 4)
    patched = patch(model)
    noise = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(5))
    base = sample(patched, positive, negative, latent(4), noise=noise)

    other_prompts = [[positive[0][0].clone(), dict(positive[0][1])]]
    other_prompts[0][0][2:] = torch.randn_like(other_prompts[0][0][2:])
    if "pooled_output" in other_prompts[0][1]:
        other_prompts[0][1]["pooled_output"] = positive[0][1]["pooled_output"].clone()
        other_prompts[0][1]["pooled_output"][2:] += 1.0
    other_noise = noise.clone()
    other_noise[2:] = torch.randn_like(other_noise[2:])
    changed = sample(patched, other_prompts, negative, latent(4), noise=other_noise)

    assert torch.allclose(changed[:2], base[:2], rtol=1e-5, atol=1e-6 * base.abs().max())
    assert not torch.allclose(changed[2:], base[2:])


def test_targets_differ_from_vanilla_and_anchors_follow_each_other(model, family):
    positive, negative = batch(family, 4)
    vanilla = sample(model, positive, negative, latent(4))
    shared = sample(patch(model), positive, negative, latent(4))
    change = (shared - vanilla).flatten(1).abs().amax(1)
    # Every image changes (anchors see each other, targets see the anchors), far above float32 rounding
    # (batching differences stay below 1e-7 of the latent's range).
    assert bool((change > 1e-5 * vanilla.abs().max()).all())


def test_batch_of_one_is_vanilla(model, family):
    positive, negative = batch(family, 1)
    vanilla = sample(model, positive, negative, latent(1))
    assert torch.equal(sample(patch(model), positive, negative, latent(1)), vanilla)


def test_more_anchors_than_images_makes_every_image_an_anchor(model, family):
    positive, negative = batch(family, 3)
    ours = sample(patch(model, anchors=8), positive, negative, latent(3))
    reference = sample(reference_patch(model, anchors=3), positive, negative, latent(3))
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())


def test_two_runs_identical_and_input_model_untouched(model, family):
    positive, negative = batch(family, 4)
    vanilla_before = sample(model, positive, negative, latent(4))
    options_before = repr(model.model_options)
    wrappers_before = repr(model.wrappers)
    patched = patch(model)
    first = sample(patched, positive, negative, latent(4))
    second = sample(patched, positive, negative, latent(4))
    assert torch.equal(first, second)
    assert repr(model.model_options) == options_before and repr(model.wrappers) == wrappers_before
    assert torch.equal(sample(model, positive, negative, latent(4)), vanilla_before)
    # The per-run state is gone once sampling ends.
    assert "spectral_anchors.run" not in repr(patched.model_options)


def test_weight_patches_and_attn2_replacements_still_apply(model, family):
    positive, negative = batch(family, 4)
    patched = patch(model)
    base = sample(patched, positive, negative, latent(4))

    lora_like = patched.clone()
    key = next(k for k in lora_like.model_state_dict() if "output_blocks" in k and "attn1.to_q.weight" in k)
    weight = lora_like.model_state_dict()[key]
    lora_like.add_patches({key: (torch.randn_like(weight) * 0.5,)}, strength_patch=1.0)
    assert not torch.allclose(sample(lora_like, positive, negative, latent(4)), base)

    with_attn2 = patched.clone()
    calls = []

    def half_cross_attention(q, k, v, extra):
        calls.append(extra["block"])
        return 0.5 * comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    layer = selected_layers(model.model.diffusion_model, "decoder")[0]
    with_attn2.set_model_attn2_replace(half_cross_attention, *layer)
    assert not torch.allclose(sample(with_attn2, positive, negative, latent(4)), base)
    assert calls


@pytest.mark.parametrize("choice", ["decoder", "decoder+middle", "all"])
def test_patch_runs_on_exactly_the_named_layers(model, family, choice):
    positive, negative = batch(family, 4)
    extended = set()

    def spy(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if k.shape[1] > q.shape[1] and k.shape[1] % q.shape[1] == 0 and "block" in options:
            extended.add((options["block"][0], options["block"][1], options["block_index"]))
        return func(q, k, v, *args, **kwargs)

    spied = patch(model, layers=choice)
    spied.model_options["transformer_options"]["optimized_attention_override"] = spy
    sample(spied, positive, negative, latent(4))
    expected = set(selected_layers(model.model.diffusion_model, choice))
    assert extended == expected
    decoder = {key for key in expected if key[0] == "output"}
    assert decoder and (choice != "decoder" or expected == decoder)


def test_start_zero_shares_on_the_first_step(model, family):
    positive, negative = batch(family, 4)
    first_step_only = dict(steps=1)
    vanilla = sample(model, positive, negative, latent(4), **first_step_only)
    assert torch.equal(sample(patch(model), positive, negative, latent(4), **first_step_only), vanilla)
    assert not torch.allclose(sample(patch(model, start=0.0), positive, negative, latent(4), **first_step_only),
                              vanilla)


def test_non_unet_model_gets_a_clear_error():
    import comfy.model_patcher

    not_a_unet = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Spectral Anchor Attention, input 'model'.*Supported: .*SDXL"):
        patch(not_a_unet)


def test_controlnet_still_applies_and_sharing_stays_exact():
    from comfy_harness import tiny_controlnet

    model = tiny_model("sdxl")
    positive, negative = batch("sdxl", 4)
    hint = torch.rand(1, 3, LATENT[1] * 8, LATENT[2] * 8, generator=torch.Generator().manual_seed(4))
    control = tiny_controlnet().copy().set_cond_hint(hint, 1.0)
    controlled = [[positive[0][0], dict(positive[0][1], control=control)]]
    without = sample(patch(model), positive, negative, latent(4))
    ours = sample(patch(model), controlled, negative, latent(4))
    reference = sample(reference_patch(model), controlled, negative, latent(4))
    assert (ours - without).abs().max() > 1e-2 * without.abs().max()
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
