"""Subject masks (with dropout) and query blending on the real ComfyUI: tiny UNets sampled through comfy.sample.

The constructed mask case: a test attn2_patch (installed before the node, as "another node" would) adds a
direction u to the cross-attention input of chosen regions on the coarsest grid, and the subject token's context
vector c is chosen so that the layer's own projections align them: (W_q u) . (W_k c) = |W_q^T W_k c|^2 > 0. The
subject token's cross-attention then peaks on those regions and nowhere else, and the masks must find them.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch
import torch.nn.functional as F
from comfy_harness import conditioning, sample, tiny_model

from spectral_anchors.attention.grid import token_grid
from spectral_anchors.attention.spectrum import Reweight, Spectrum, Truncate
from spectral_anchors.nodes.anchor_attention import SharingPlan, apply_sharing
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.run_context import MASKS_SCRATCH_KEY as MASKS_KEY
from spectral_anchors.nodes.run_context import QUERY_BLEND_KEY, call_of
from spectral_anchors.nodes.story import Story
from spectral_anchors.nodes.unet_layout import coarsest_cross_attention_layers, cross_attention_module, selected_layers

LATENT = (16, 24)  # non-square: SDXL-tiny grids 16x24, 8x12, 4x6 (coarsest); SD1.5-tiny down to 2x3
SMALL_LATENT = (8, 12)  # for the many-step query-blending runs
SUBJECT_TOKENS = ((2,), (5, 6), (7,))  # image 1's subject word has two tokens
STEER = 8.0  # how far the steered regions move along u: enough for a ~10x probability contrast


def story(subject_tokens=SUBJECT_TOKENS) -> Story:
    prompts = tuple(f"scene {i}" for i in range(len(subject_tokens)))
    return Story(prompts=prompts, subject_tokens=subject_tokens, subject_word="fox", width=192, height=128,
                 same_noise=False)


def region(grid, rows, cols):
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def regions_of(grid):
    """Per image, (which subject vector, where it peaks) on the coarsest grid."""
    h, w = grid
    return [
        [(0, region(grid, (0, h // 2), (0, w // 2)))],
        [(0, region(grid, (h // 2, h), (w // 2, w))), (1, region(grid, (0, h // 2), (w - 1, w)))],
        [(0, region(grid, (1, h), (1, 3)))],
    ]


def expected_mask(coarse_grid, image, grid):
    union = torch.zeros(coarse_grid, dtype=torch.bool)
    for _, area in regions_of(coarse_grid)[image]:
        union |= area
    return F.interpolate(union[None, None].float(), size=grid, mode="nearest")[0, 0].bool()


class SubjectSteering:
    """The test's own attn2_patch: steers the coarsest cross-attention, and keeps hold of the run's mask state."""

    def __init__(self, model, steer=True):
        self.unet = model.model.diffusion_model
        self.coarsest = coarsest_cross_attention_layers(self.unet)
        generator = torch.Generator().manual_seed(3)
        self.vectors = [torch.randn(64, generator=generator) for _ in range(2)]
        self.steer = steer
        self.history = None
        self.keeps = []  # (step, grid, anchors, kept tokens, subject tokens) of every anchor_keep call

    def install(self, model):
        patched = model.clone()

        def steer(n, context, value, extra):  # a function: ModelPatcher.clone deep-copies objects in model_options
            return self(n, context, value, extra)

        patched.set_model_attn2_patch(steer)
        return patched

    def conditioning(self, family, batch=3):
        positive = conditioning(family, batch, 1)
        for image, tokens in enumerate(SUBJECT_TOKENS[:batch]):
            for token, vector in zip(tokens, self.vectors, strict=False):
                positive[0][0][image, token] = vector
        return positive

    def _direction(self, layer, vector):
        attention = cross_attention_module(self.unet, layer)
        u = attention.to_q.weight.T @ (attention.to_k.weight @ vector)
        return u / u.norm()

    def _watch(self, history):
        self.history = history
        original = history.anchor_keep

        def recording_anchor_keep(step, grid, anchors):
            kept = original(step, grid, anchors)
            masks = history.masks(step, grid)
            subject = None if masks is None else [set(m.nonzero().flatten().tolist()) for m in masks[:anchors]]
            self.keeps.append((step, tuple(grid), anchors, None if kept is None else [k.tolist() for k in kept],
                               subject))
            return kept

        history.anchor_keep = recording_anchor_keep

    def __call__(self, n, context, value, extra):
        layer = (extra["block"][0], extra["block"][1], extra["block_index"])
        if layer not in self.coarsest:
            return n, context, value
        call = call_of(extra)
        history = call.run.scratch.get(MASKS_KEY) if call is not None and call.run is not None else None
        if history is not None and history is not self.history:
            self._watch(history)
        if self.steer:
            shape = extra["original_shape"]
            grid = token_grid(shape[-2], shape[-1], n.shape[1])
            per_chunk = n.shape[0] // len(extra["cond_or_uncond"])
            n = n.clone()
            for row in range(n.shape[0]):
                for vector_index, area in regions_of(grid)[row % per_chunk]:
                    n[row, area.flatten()] += STEER * self._direction(layer, self.vectors[vector_index])
        return n, context, value


def from_a_sharing_layer(options) -> bool:
    # The sharing layers pass the block's extra_options (which carry n_heads); ComfyUI's own cross-attention
    # passes the plain transformer_options.
    return "n_heads" in options and "block" in options


class ExtendedKeySpy:
    """optimized_attention_override on the sharing layers' calls: step, chunks, grid tokens, key length, the mask
    counts the run's mask state holds at that moment and the query-blending pass, split into extended calls
    (more keys than queries) and plain ones."""

    def __init__(self):
        self.extended = []  # calls with more keys than queries: the sharing ones
        self.plain = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = call_of(options)
        if call is not None and from_a_sharing_layer(options):
            history = call.run.scratch.get(MASKS_KEY) if call.run is not None else None
            shape = options["original_shape"]
            grid = token_grid(shape[-2], shape[-1], q.shape[1])
            masks = history.masks(call.step, grid) if history is not None else None
            counts = None if masks is None else [int(m.sum()) for m in masks]
            call_record = dict(step=call.step, chunks=tuple(options["cond_or_uncond"]), tokens=q.shape[1],
                               key_length=k.shape[1], mask_counts=counts, blend=options.get(QUERY_BLEND_KEY))
            (self.extended if k.shape[1] > q.shape[1] else self.plain).append(call_record)
        return func(q, k, v, *args, **kwargs)


def spy_on(model):
    spy = ExtendedKeySpy()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda *args, **kwargs: spy(*args, **kwargs))
    return spy


def share(model, **options):
    return apply_sharing(model, SharingPlan(anchor_count=2, layers="decoder", start_percent=0.01, end_percent=1.0,
                                            **options))


def latent(batch=3, size=LATENT):
    return torch.zeros(batch, 4, *size)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


def iou(a, b):
    return (a & b).sum().item() / (a | b).sum().item()


def test_masks_find_the_constructed_subject_regions(model, family):
    steering = SubjectSteering(model)
    patched = share(steering.install(model), subject_masks=True, story=story(), mask_dropout=0.0)
    spy = spy_on(patched)
    out = sample(patched, steering.conditioning(family), conditioning(family, 1, 99), latent(), steps=4)
    assert torch.isfinite(out).all()

    history = steering.history
    coarse = history.source_grid
    assert coarse == ((4, 6) if family == "sdxl" else (2, 3))
    finest = LATENT
    for grid in (coarse, token_grid(*LATENT, LATENT[0] * LATENT[1] // 4), finest):
        masks = history.masks(99, grid)  # from every step of the run
        for image in range(3):
            expected = expected_mask(coarse, image, grid)
            found = masks[image].reshape(grid)
            if grid == coarse:
                assert torch.equal(found, expected), (grid, image)
            else:
                # Bilinear upsampling blurs the block edges by up to one coarse cell's fraction.
                assert iou(found, expected) >= 0.8, (grid, image, iou(found, expected))
                others = [expected_mask(coarse, other, grid) for other in range(3) if other != image]
                assert all(iou(found, other) < iou(found, expected) - 0.3 for other in others)

    # The sharing layers used the masks: from step 1 on an anchor adds the other anchor's subject tokens only,
    # a target both anchors' (dropout 0), in both chunks.
    late = [c for c in spy.extended if c["step"] >= 1]
    assert late and all(c["mask_counts"] is not None for c in late)
    for c in late:
        first, second = c["mask_counts"][:2]
        assert 0 < first < c["tokens"] and 0 < second < c["tokens"]
        assert c["key_length"] - c["tokens"] in (first, second, first + second)
    assert {c["chunks"] for c in late} == {(1, 0)}
    assert len({c["tokens"] for c in late}) >= 2  # masks on more than one grid size
    # Step 0 is plain (default start), so there is nothing before the first mask exists.
    assert all(c["step"] >= 1 for c in spy.extended)


def test_before_the_first_mask_anchors_share_all_tokens(sdxl):
    steering = SubjectSteering(sdxl)
    patched = apply_sharing(steering.install(sdxl), SharingPlan(2, "decoder", 0.0, 1.0, subject_masks=True,
                                                                story=story(), mask_dropout=0.0))
    spy = spy_on(patched)
    sample(patched, steering.conditioning("sdxl"), conditioning("sdxl", 1, 99), latent(), steps=2)
    step_zero = [c for c in spy.extended if c["step"] == 0]
    assert step_zero and all(c["mask_counts"] is None for c in step_zero)
    # Anchors see one other anchor in full (2N), targets both anchors in full (3N).
    assert {c["key_length"] // c["tokens"] for c in step_zero} == {2, 3}
    assert all(c["key_length"] % c["tokens"] == 0 for c in step_zero)
    assert any(c["mask_counts"] is not None for c in spy.extended if c["step"] == 1)


def test_masks_off_is_bit_identical_to_sharing_without_the_options(model, family):
    positive, negative = conditioning(family, 3, 1), conditioning(family, 1, 99)
    before = sample(share(model), positive, negative, latent(), steps=3)
    off = share(model, subject_masks=False, story=story(), mask_dropout=0.2, mask_seed=7, query_blend=False)
    assert torch.equal(sample(off, positive, negative, latent(), steps=3), before)
    # Nothing is installed for the options that are off.
    transformer_options = off.model_options["transformer_options"]
    assert "attn2_patch" not in transformer_options.get("patches", {})
    assert not off.wrappers.get("diffusion_model")
    # An old workflow (no new inputs) and the new inputs at their defaults build the same plan and images.
    old = SpectralAnchorAttention.execute(model, 2, "decoder", 0.01, 1.0).result[0]
    new = SpectralAnchorAttention.execute(model, 2, "decoder", 0.01, 1.0, None, None, None, False, 0.5, 0,
                                          False).result[0]
    assert old.get_attachment("spectral_anchors.sharing_plan") == new.get_attachment("spectral_anchors.sharing_plan")
    assert torch.equal(sample(new, positive, negative, latent(), steps=3), before)


def test_masks_coexist_with_another_nodes_attn2_replacement(sdxl):
    steering = SubjectSteering(sdxl)
    replaced_layers = sorted(steering.coarsest) + [selected_layers(sdxl.model.diffusion_model, "decoder")[-1]]
    calls = []

    def half_cross_attention(q, k, v, extra):  # stands in for IPAdapter's attn2 replacement
        calls.append((extra["block"][0], extra["block"][1], extra["block_index"]))
        return 0.5 * comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    other_node = steering.install(sdxl)
    for layer in replaced_layers:
        other_node.set_model_attn2_replace(half_cross_attention, *layer)
    plan = dict(subject_masks=True, story=story(), mask_dropout=0.0)
    positive, negative = steering.conditioning("sdxl"), conditioning("sdxl", 1, 99)
    with_replacement = sample(share(other_node, **plan), positive, negative, latent(), steps=3)

    assert set(calls) == set(replaced_layers)  # the replacement still runs, on every layer it claimed
    coarse = steering.history.source_grid
    masks = steering.history.masks(99, coarse)
    for image in range(3):
        assert torch.equal(masks[image].reshape(coarse), expected_mask(coarse, image, coarse))
    # ...and still takes effect.
    without = sample(share(steering.install(sdxl), **plan), positive, negative, latent(), steps=3)
    assert (with_replacement - without).abs().max() > 1e-3 * without.abs().max()
    # Reading does not claim attn2 for itself.
    patched = share(sdxl, **plan)
    assert not patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2")


def run_with_dropout(model, seed, steps=4):
    steering = SubjectSteering(model)
    patched = share(steering.install(model), subject_masks=True, story=story(), mask_dropout=0.5, mask_seed=seed)
    out = sample(patched, steering.conditioning("sdxl"), conditioning("sdxl", 1, 99), latent(), steps=steps)
    return out, steering


def test_dropout_is_reproducible_redrawn_per_step_and_shared_by_a_grids_layers(sdxl):
    first, spied = run_with_dropout(sdxl, seed=5)
    again, spied_again = run_with_dropout(sdxl, seed=5)
    other, spied_other = run_with_dropout(sdxl, seed=6)
    assert torch.equal(first, again) and spied.keeps == spied_again.keeps
    assert not torch.allclose(first, other)

    by_step_grid = {}
    for step, grid, anchors, kept, subject in spied.keeps:
        assert kept is not None and anchors == 2
        by_step_grid.setdefault((step, grid), []).append(kept)
        for kept_tokens, subject_tokens in zip(kept, subject, strict=True):
            # Half of each anchor's subject tokens are dropped (rounded half up), the rest kept.
            assert set(kept_tokens) <= subject_tokens
            assert len(kept_tokens) == len(subject_tokens) - int(0.5 * len(subject_tokens) + 0.5) > 0
    # Every layer of one grid size gets the same tokens in a step (several decoder layers share a grid).
    assert any(len(draws) > 1 for draws in by_step_grid.values())
    assert all(all(d == draws[0] for d in draws) for draws in by_step_grid.values())
    steps = sorted({step for step, _ in by_step_grid})
    grids = sorted({grid for _, grid in by_step_grid})
    assert steps == [1, 2, 3]
    for grid in grids:
        draws = [by_step_grid[(step, grid)][0] for step in steps]
        assert all(a != b for a, b in zip(draws, draws[1:], strict=False)), grid  # redrawn every step
    other_draws = {(step, grid): kept for step, grid, _, kept, _ in spied_other.keeps}
    assert any(other_draws[key] != draws[0] for key, draws in by_step_grid.items())


def test_the_cond_chunks_mask_serves_the_uncond_chunk(sdxl):
    # 77 against 78 tokens cannot be batched: cond and uncond run as separate forwards, uncond without cond.
    steering = SubjectSteering(sdxl)
    patched = share(steering.install(sdxl), subject_masks=True, story=story(), mask_dropout=0.5, mask_seed=1)
    spy = spy_on(patched)
    sample(patched, steering.conditioning("sdxl"), conditioning("sdxl", 1, 99, tokens=78), latent(), steps=3)
    lengths = {}
    for c in spy.extended:
        lengths.setdefault(c["chunks"], []).append((c["step"], c["tokens"], c["key_length"]))
    assert set(lengths) == {(0,), (1,)}
    assert sorted(lengths[(0,)]) == sorted(lengths[(1,)])
    assert any(k % t for _, t, k in lengths[(1,)])  # masked: not whole multiples of the grid


def blend_steps_seen(spy):
    return sorted({c["step"] for c in spy.plain if c["blend"] is not None and c["blend"].recording})


def test_query_blending_runs_the_extra_forward_only_on_the_early_sharing_steps(sdxl):
    positive, negative = conditioning("sdxl", 3, 1), conditioning("sdxl", 1, 99)
    patched = share(sdxl, query_blend=True)
    attention_calls = []

    def count(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        call = call_of(options)
        blend = options.get(QUERY_BLEND_KEY)
        if call is not None:
            attention_calls.append((call.step, None if blend is None else (blend.recording, blend.weight),
                                    from_a_sharing_layer(options), k.shape[1] == q.shape[1]))
        return func(q, k, v, *args, **kwargs)

    patched.model_options["transformer_options"]["optimized_attention_override"] = count
    sample(patched, positive, negative, latent(size=SMALL_LATENT), steps=30)
    # 30 steps: the first 3 blend, but step 0 does not share (default start): steps 1 and 2 only.
    recording = sorted({step for step, blend, _, _ in attention_calls if blend is not None and blend[0]})
    assert recording == [1, 2]
    weights = {step: blend[1] for step, blend, _, _ in attention_calls if blend is not None}
    assert weights == {1: pytest.approx(0.86), 2: pytest.approx(0.82)}
    # Those steps run the UNet twice, every other step once (counted by cross-attention calls, a fixed number
    # per forward).
    cross_attention_calls = {}
    for step, _, sharing, _ in attention_calls:
        cross_attention_calls[step] = cross_attention_calls.get(step, 0) + (not sharing)
    once = cross_attention_calls[3]
    assert once > 0 and cross_attention_calls[1] == cross_attention_calls[2] == 2 * once
    assert all(cross_attention_calls[step] == once for step in range(30) if step not in (1, 2))
    # The recording forward is plain: no extended attention in it.
    recorded = [same for _, blend, sharing, same in attention_calls if blend is not None and blend[0] and sharing]
    assert recorded and all(recorded)


def test_query_blending_with_zero_weight_equals_no_blending_bit_for_bit(sdxl):
    positive, negative = conditioning("sdxl", 3, 1), conditioning("sdxl", 1, 99)
    run = dict(steps=20)
    without = sample(share(sdxl), positive, negative, latent(size=SMALL_LATENT), **run)
    zero = sample(share(sdxl, query_blend=True, query_blend_weights=(0.0, 0.0)), positive, negative,
                  latent(size=SMALL_LATENT), **run)
    blended = sample(share(sdxl, query_blend=True), positive, negative, latent(size=SMALL_LATENT), **run)
    assert torch.equal(zero, without)
    assert (blended - without).abs().max() > 1e-4 * without.abs().max()


def test_query_blending_does_nothing_after_the_first_tenth_of_the_steps(sdxl):
    # Sharing starting at half the schedule: no sharing step lies in the first tenth, so blending never fires.
    positive, negative = conditioning("sdxl", 3, 1), conditioning("sdxl", 1, 99)
    late_plan = dict(anchor_count=2, layers="decoder", start_percent=0.5, end_percent=1.0)
    plain = apply_sharing(sdxl, SharingPlan(**late_plan))
    blending = apply_sharing(sdxl, SharingPlan(**late_plan, query_blend=True))
    spy = spy_on(blending)
    reference = sample(plain, positive, negative, latent(size=SMALL_LATENT), steps=20)
    assert torch.equal(sample(blending, positive, negative, latent(size=SMALL_LATENT), steps=20), reference)
    assert spy.extended and blend_steps_seen(spy) == []


def test_with_masks_and_blending_anchors_still_do_not_depend_on_targets(sdxl):
    positive, negative = conditioning("sdxl", 4, 1), conditioning("sdxl", 1, 99)
    four_scenes = story(SUBJECT_TOKENS + ((3,),))
    patched = share(sdxl, subject_masks=True, story=four_scenes, mask_dropout=0.5, mask_seed=2, query_blend=True)
    noise = torch.randn(4, 4, *SMALL_LATENT, generator=torch.Generator().manual_seed(5))
    run = dict(steps=20, noise=noise)
    base = sample(patched, positive, negative, latent(4, SMALL_LATENT), **run)
    # Two runs on one MODEL are identical: the mask state starts empty with every run.
    assert torch.equal(sample(patched, positive, negative, latent(4, SMALL_LATENT), **run), base)

    changed_prompts = [[positive[0][0].clone(), dict(positive[0][1])]]
    changed_prompts[0][0][2:] = torch.randn_like(changed_prompts[0][0][2:])
    changed_prompts[0][1]["pooled_output"] = positive[0][1]["pooled_output"].clone()
    changed_prompts[0][1]["pooled_output"][2:] += 1.0
    changed_noise = noise.clone()
    changed_noise[2:] = torch.randn_like(changed_noise[2:])
    changed = sample(patched, changed_prompts, negative, latent(4, SMALL_LATENT), steps=20, noise=changed_noise)
    assert torch.allclose(changed[:2], base[:2], rtol=1e-5, atol=1e-6 * base.abs().max())
    assert not torch.allclose(changed[2:], base[2:])


SPECTRA = dict(key_spectrum=Spectrum((Truncate("energy", 0.9),)),
               value_spectrum=Spectrum((Reweight("log_squared"), Truncate("quantile", 0.5))))


@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("masks,blend", [(True, False), (False, True), (True, True)])
def test_every_option_combines_with_spectra_and_cfg_one(sdxl, cfg, masks, blend):
    steering = SubjectSteering(sdxl, steer=False)
    base = steering.install(sdxl)
    positive, negative = steering.conditioning("sdxl"), conditioning("sdxl", 1, 99)
    options = dict(subject_masks=masks, story=story(), mask_dropout=0.5, query_blend=blend)
    run = dict(steps=20, cfg=cfg)
    spectra_only = sample(share(base, **SPECTRA), positive, negative, latent(size=SMALL_LATENT), **run)
    spy_target = share(base, **options, **SPECTRA)
    spy = spy_on(spy_target)
    combined = sample(spy_target, positive, negative, latent(size=SMALL_LATENT), **run)
    assert torch.isfinite(combined).all()
    assert (combined - spectra_only).abs().max() > 1e-4 * spectra_only.abs().max()
    if masks:
        assert any(c["mask_counts"] is not None for c in spy.extended)
        assert {c["chunks"] for c in spy.extended} == ({(0,)} if cfg == 1.0 else {(1, 0)})
    if blend:
        assert blend_steps_seen(spy) == [1]


def test_masks_without_a_story_or_subject_give_clear_errors(sdxl):
    with pytest.raises(ValueError, match=r"Spectral Anchor Attention, input 'story'.*Spectral Story Prompts"):
        SpectralAnchorAttention.execute(sdxl, 2, "decoder", 0.01, 1.0, subject_masks=True)
    missing = Story(prompts=("a fox", "a tree"), subject_tokens=((2,), ()), subject_word="fox", width=64,
                    height=64, same_noise=False)
    with pytest.raises(ValueError, match=r"scene 2"):
        SpectralAnchorAttention.execute(sdxl, 2, "decoder", 0.01, 1.0, story=missing, subject_masks=True)
    # A story whose scene count does not match the sampled batch is named at sampling time.
    patched = SpectralAnchorAttention.execute(sdxl, 2, "decoder", 0.01, 1.0, story=story(SUBJECT_TOKENS[:2]),
                                              subject_masks=True).result[0]
    with pytest.raises(ValueError, match=r"input 'story'.*2 scenes.*3 images"):
        sample(patched, conditioning("sdxl", 3, 1), conditioning("sdxl", 1, 99), latent(), steps=2)


def test_new_inputs_are_optional_with_tooltips():
    schema = SpectralAnchorAttention.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    for name in ("story", "subject_masks", "mask_dropout", "mask_seed", "query_blending"):
        assert inputs[name].optional and inputs[name].tooltip
    names = [i.id for i in schema.inputs]
    assert names[:7] == ["model", "anchors", "layers", "start_percent", "end_percent", "key_spectrum",
                         "value_spectrum"]
