"""SpectralFeatureInjection on the real ComfyUI: tiny SDXL / SD1.5 UNets sampled through comfy.sample.

Probes are attn1 output patches of the test's own, one registered before the node and one after it, so each
self-attention call shows its outputs just before and just after the injection.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_harness import conditioning, tiny_model

from spectral_anchors.nodes import node_list
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.feature_injection import finest_self_attention_layers
from spectral_anchors.nodes.feature_injection_node import SpectralFeatureInjection
from spectral_anchors.nodes.feature_injection_passes import feature_step
from spectral_anchors.nodes.run_context import INJECTION_RUN_KEY as INJECTION_KEY
from spectral_anchors.nodes.run_context import INJECTION_SETTINGS_KEY as SETTINGS_KEY
from spectral_anchors.nodes.run_context import RUN_KEY, call_of
from spectral_anchors.nodes.story import Story
from spectral_anchors.nodes.unet_layout import feature_block

# Non-square latents whose finest attention grid is 8x12 in both families (SDXL-tiny attends from 1/2 of the
# latent grid on, SD1.5-tiny from the latent grid itself).
LATENT = {"sdxl": (16, 24), "sd15": (8, 12)}
IMAGES = 3  # two anchors and one target
STEPS = 10


def attention(model, anchors=2, **options):
    return SpectralAnchorAttention.execute(model, anchors, "decoder", 0.01, 1.0, **options).result[0]


def injection(model, strength=0.8, start=0.1, end=0.333, layers="finest", anchors=2, source="two-pass"):
    return SpectralFeatureInjection.execute(model, strength, start, end, layers, anchors, source).result[0]


def prompts(family, images=IMAGES):
    return conditioning(family, images, 1), conditioning(family, 1, 99)


def run(model, family, cfg=5.0, images=IMAGES, size=None, steps=STEPS, trace=None):
    """Sample like the stock KSampler; `trace` collects (step, denoised, x) of every progress callback.

    The sampler calls back after step i's model call and before its update: x is the input of step i.
    """
    positive, negative = prompts(family, images)
    latent = torch.zeros(images, 4, *(size or LATENT[family]))
    noise = comfy.sample.prepare_noise(latent, 3)
    callback = None if trace is None else (lambda step, x0, x, total: trace.append((step, x0.clone(), x.clone())))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               callback=callback, disable_pbar=True, seed=3)


class Probe:
    """Checks every self-attention call: outputs change exactly as the run's correspondence says, or not at all."""

    def __init__(self):
        self.calls = []
        self.states = []
        self._before = []

    def install_before(self, model):
        patched = model.clone()
        patched.set_model_attn1_output_patch(lambda n, extra: self._keep(n))
        return patched

    def install_after(self, model):
        patched = model.clone()
        patched.set_model_attn1_output_patch(lambda n, extra: self._check(n, extra))
        return patched

    def _keep(self, n):
        self._before.append(n.clone())
        return n

    def _check(self, after, extra):
        before = self._before.pop()
        state = extra.get(INJECTION_KEY)
        call = call_of(extra)
        layer = (extra["block"][0], extra["block"][1], extra["block_index"])
        chunks = list(extra["cond_or_uncond"])
        if state is not None and all(state is not seen for seen in self.states):
            self.states.append(state)
        expected = before
        correspondence = None if state is None or state.first_pass else state.correspondence
        if (correspondence is not None and call.step in state.window and layer in self.layers and 0 in chunks
                and after.shape[1] == correspondence.token_count):
            expected = before.clone()
            per_chunk = before.shape[0] // len(chunks)
            first = chunks.index(0) * per_chunk
            images, tokens = correspondence.injected.nonzero(as_tuple=True)
            sources = first + correspondence.source_image[images, tokens]
            matched = correspondence.source_token[images, tokens]
            strength = state.settings.strength
            expected[first + images, tokens] = (strength * before[sources, matched]
                                                + (1 - strength) * before[first + images, tokens])
        changed = (after != before).any(-1)
        self.calls.append(dict(first_pass=state is not None and state.first_pass, step=call.step, layer=layer,
                               chunks=chunks, changed=int(changed.sum()), exact=torch.equal(after, expected),
                               changed_rows=changed.any(-1).nonzero().flatten().tolist()))
        return after


def probed(model, family_model, **options):
    probe = Probe()
    probe.layers = set(finest_self_attention_layers(family_model.model.diffusion_model, options.get("layers",
                                                                                                    "finest")))
    patched = probe.install_after(injection(probe.install_before(model), **options))
    return probe, patched


@pytest.fixture(scope="module")
def reference(model, family):
    """Attention only: the run injection must reproduce wherever it injects nothing."""
    shared = attention(model)
    trace = []
    return shared, run(shared, family, trace=trace), trace


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_injection_changes_only_the_injected_tokens_of_the_cond_chunk_in_the_window(model, family, cfg):
    probe, patched = probed(attention(model), model)
    run(patched, family, cfg=cfg)
    assert len(probe.states) == 1
    state = probe.states[0]
    # 10 normal-schedule steps sit at percents i / 9: 1/9 and 2/9 lie in 0.1..0.333, 3/9 just past it.
    assert list(state.window) == [1, 2]
    assert all(call["exact"] for call in probe.calls)
    injecting = [call for call in probe.calls if call["changed"]]
    assert injecting, "nothing was injected: the test could not have failed"
    assert {call["step"] for call in injecting} == {1, 2}
    assert {call["layer"] for call in injecting} == probe.layers  # encoder and decoder of the finest grid
    assert not any(call["first_pass"] for call in injecting)
    for call in injecting:  # rows of the cond chunk only
        per_chunk = IMAGES
        first = call["chunks"].index(0) * per_chunk
        assert set(call["changed_rows"]) <= set(range(first, first + per_chunk))
    assert any(call["first_pass"] for call in probe.calls)
    # The first pass stops at the feature step: no UNet call after it.
    feature = max(call["step"] for call in probe.calls if call["first_pass"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).tolist()
    assert feature == feature_step(model.get_model_object("model_sampling"), sigmas, 261)
    assert 0 < state.correspondence.injected.sum() < state.correspondence.injected.numel()


def test_strength_zero_or_an_empty_window_is_bit_identical_to_attention_only(model, family, reference):
    shared, expected, _ = reference
    for options in (dict(strength=0.0), dict(start=0.5, end=0.5), dict(start=0.95, end=0.99)):  # no step at 0.95-0.99
        assert torch.equal(run(injection(shared, **options), family), expected), options


def test_the_first_pass_is_the_same_sampling_and_leaves_nothing_behind(model, family):
    story = Story(prompts=("a", "b", "c"), subject_tokens=((2,), (5,), (7,)), subject_word="fox", width=192,
                  height=128, same_noise=False)
    shared = attention(model, story=story, subject_masks=True, mask_dropout=0.5)
    plain_trace = []
    plain = run(shared, family, trace=plain_trace)
    patched = injection(shared, start=0.3, end=0.6)
    options_before = repr(patched.model_options)
    trace = []
    first = run(patched, family, trace=trace)

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).tolist()
    k = feature_step(model.get_model_object("model_sampling"), sigmas, 261)
    assert 3 < k < STEPS - 1
    steps = [entry[0] for entry in trace]
    assert steps == list(range(k)) + list(range(STEPS))  # the progress: first pass to the feature step, then all
    for step in range(k):  # the first pass is the attention-only sampling, bit for bit
        assert torch.equal(trace[step][1], plain_trace[step][1]) and torch.equal(trace[step][2], plain_trace[step][2])
    second_pass = trace[k:]
    for step in range(3):  # before the window (steps 3..5) the real pass is the attention-only one, bit for bit
        assert torch.equal(second_pass[step][1], plain_trace[step][1])
    assert torch.equal(second_pass[3][2], plain_trace[3][2])  # step 3's input is still the same...
    assert not torch.equal(second_pass[3][1], plain_trace[3][1])  # ...its prediction is injected
    assert not torch.equal(first, plain)

    assert repr(patched.model_options) == options_before
    assert RUN_KEY not in patched.model_options["transformer_options"]
    assert INJECTION_KEY not in patched.model_options["transformer_options"]
    assert torch.equal(run(patched, family), first)  # two runs on one MODEL: identical
    other_size = run(patched, family, size=(12, 12))  # another size: no stale correspondences
    assert torch.isfinite(other_size).all()


def test_subject_masks_of_the_attention_node_limit_the_injected_tokens(model, family):
    story = Story(prompts=("a", "b", "c"), subject_tokens=((2,), (5,), (7,)), subject_word="fox", width=192,
                  height=128, same_noise=False)
    probe, patched = probed(attention(model, story=story, subject_masks=True), model)
    run(patched, family)
    state = probe.states[0]
    assert state.subject_masks is not None
    assert not bool((state.correspondence.injected & ~state.subject_masks).any())
    assert all(call["exact"] for call in probe.calls)
    # Recomputed from the kept masks, only the anchors' subject tokens are ever matched.
    for image in range(1, IMAGES):
        sources = state.correspondence.source_image[image]
        tokens = state.correspondence.source_token[image]
        valid = sources >= 0
        assert bool(state.subject_masks[sources[valid], tokens[valid]].all())


def test_the_attention_nodes_anchor_count_wins(model, family, reference):
    shared, expected, _ = reference
    one_anchor = attention(model, anchors=1)
    plain = run(one_anchor, family)
    for order in ("after", "before"):  # the injection node after the attention node, or before it
        if order == "after":
            probe, patched = probed(one_anchor, model, anchors=3)
        else:
            probe, injected_first = probed(model, model, anchors=3)
            patched = attention(injected_first, anchors=1)
        out = run(patched, family)
        state = probe.states[0]
        assert state.anchor_count == 1
        assert bool((state.correspondence.source_image[0] == -1).all())  # a lone anchor has no source
        assert torch.equal(out[0], plain[0])  # so it is untouched, bit for bit
        assert not torch.equal(out[1:], plain[1:])
    standalone_probe, standalone = probed(model, model, anchors=3)
    run(standalone, family)
    assert standalone_probe.states[0].anchor_count == 3


def test_single_pass_runs_once_and_injects_in_the_window_only(model, family, reference):
    _, expected, _ = reference
    probe, patched = probed(attention(model), model, source="single-pass", start=0.2, end=0.5)
    trace = []
    out = run(patched, family, trace=trace)
    assert [entry[0] for entry in trace] == list(range(STEPS))  # one pass
    assert not any(call["first_pass"] for call in probe.calls)
    assert all(call["exact"] for call in probe.calls)
    injecting = {call["step"] for call in probe.calls if call["changed"]}
    assert injecting and injecting <= {2, 3, 4}
    assert not torch.equal(out, expected)
    assert torch.equal(run(patched, family), out)


def test_decoder_only_layers(model, family):
    probe, patched = probed(attention(model), model, layers="finest_decoder")
    run(patched, family)
    changed_layers = {call["layer"] for call in probe.calls if call["changed"]}
    assert changed_layers and all(layer[0] == "output" for layer in changed_layers)
    assert all(call["exact"] for call in probe.calls)


def test_the_features_come_from_the_stage_that_feeds_the_finest_grid():
    sdxl = tiny_model("sdxl").model.diffusion_model
    sd15 = tiny_model("sd15").model.diffusion_model
    # SDXL-tiny attends at levels 1 and 2: the finest is level 1 (input 3, output 2-3), fed by output blocks 0-1.
    assert finest_self_attention_layers(sdxl, "finest") == [("input", 3, 0), ("output", 2, 0), ("output", 3, 0)]
    assert feature_block(sdxl) == 2
    # SD1.5-tiny attends at levels 0-2: the finest is the latent grid (input 1, output 6-7), fed by blocks 4-5.
    assert finest_self_attention_layers(sd15, "finest_decoder") == [("output", 6, 0), ("output", 7, 0)]
    assert feature_block(sd15) == 6


def test_node_schema_registration_and_errors(model):
    schema = SpectralFeatureInjection.define_schema()
    assert schema.node_id == "SpectralFeatureInjection" and schema.description
    assert all(item.tooltip for item in schema.inputs)
    assert [item.id for item in schema.inputs][:4] == ["model", "strength", "start_percent", "end_percent"]
    assert SpectralFeatureInjection in node_list()
    with pytest.raises(ValueError, match="Spectral Feature Injection, input 'strength'"):
        injection(model, strength=1.5)
    with pytest.raises(ValueError, match="input 'layers'"):
        injection(model, layers="all")

    class NotAUnet:
        model = torch.nn.Module()

    with pytest.raises(ValueError, match="Spectral Feature Injection, input 'model'"):
        injection(NotAUnet())
    patched = injection(model)
    assert patched is not model and patched.get_attachment(SETTINGS_KEY).strength == 0.8
    assert model.get_attachment(SETTINGS_KEY) is None  # the input MODEL is untouched


def test_custom_sampler_path_with_an_sde_sampler_keeps_the_first_pass_exact(model, family):
    """SamplerCustomAdvanced path (a guider, a sampler object, sigmas); dpmpp_2m_sde draws Brownian noise over
    the whole schedule, so a first pass on a shortened schedule would diverge from step 1 on."""
    positive, negative = prompts(family)
    latent = torch.zeros(IMAGES, 4, *LATENT[family])
    noise = comfy.sample.prepare_noise(latent, 3)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", STEPS)

    def sample_custom(patched):
        trace = []
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(4.0)
        out = guider.sample(noise, latent, comfy.samplers.sampler_object("dpmpp_2m_sde"), sigmas,
                            callback=lambda step, x0, x, total: trace.append((step, x.clone())), disable_pbar=True,
                            seed=3)
        return out, trace

    shared = attention(model)
    plain, plain_trace = sample_custom(shared)
    probe, patched = probed(shared, model)
    out, trace = sample_custom(patched)
    k = feature_step(model.get_model_object("model_sampling"), sigmas.tolist(), 261)
    assert [entry[0] for entry in trace] == list(range(k)) + list(range(STEPS))
    assert all(torch.equal(trace[step][1], plain_trace[step][1]) for step in range(k))
    assert any(call["changed"] for call in probe.calls) and all(call["exact"] for call in probe.calls)
    assert not torch.equal(out, plain)
