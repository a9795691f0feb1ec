"""Spectral Consistency Preset on the real ComfyUI: every preset samples exactly what its stated settings do when
built by hand from the research nodes, through the stock KSampler path (nodes.common_ksampler)."""

from __future__ import annotations

import pytest
import torch
from comfy_api.latest import io
from comfy_harness import conditioning, with_hidden

import nodes as comfy_nodes
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.preset import PRESET_NAMES, PRESETS
from spectral_anchors.nodes.preset_node import SpectralConsistencyPreset
from spectral_anchors.nodes.spectrum_node import SpectralReweight, SpectralTruncate
from spectral_anchors.nodes.spectrum_plot_node import SpectralSpectrumPlot
from spectral_anchors.nodes.spectrum_plot_recording import recorder_of

# A non-square latent. 6 steps, except for presets with query blending: it acts in the first tenth of the steps
# after the first, so only from 20 steps on.
LATENT = (4, 16, 24)
STEPS = 6
BLENDING_STEPS = 20
IMAGES = 4


def ksampler(model, family: str, latent: dict, seed: int = 7, steps: int = STEPS) -> torch.Tensor:
    positive, negative = conditioning(family, IMAGES, 1), conditioning(family, 1, 99)
    return comfy_nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent)[0][
        "samples"]


def empty_latent(same_noise: bool = False) -> dict:
    latent = {"samples": torch.zeros(IMAGES, *LATENT)}
    if same_noise:  # what Spectral Story Prompts' same_noise does
        latent["batch_index"] = [0] * IMAGES
    return latent


def preset(model, name: str, anchors: int = 2, **spectra):
    return SpectralConsistencyPreset.execute(model, name, anchors, **spectra).result[0]


def by_hand(model, name: str, anchors: int = 2):
    """The preset's stated settings, built from Spectral Anchor Attention and the spectrum nodes as a user would."""
    settings = PRESETS[name]
    spectra = {}
    for socket, chain in (("key_spectrum", settings.key_chain), ("value_spectrum", settings.value_chain)):
        spectrum = None
        for node_id, inputs in chain:
            node = {"SpectralTruncate": SpectralTruncate, "SpectralReweight": SpectralReweight}[node_id]
            spectrum = node.execute(**inputs, spectrum=spectrum).result[0]
        if spectrum is not None:
            spectra[socket] = spectrum
    return SpectralAnchorAttention.execute(model, anchors, settings.layers, settings.start_percent,
                                           settings.end_percent, subject_masks=settings.subject_masks,
                                           query_blending=settings.query_blending, **spectra).result[0]


def test_presets_offer_plain_words_and_custom():
    assert PRESET_NAMES[0] == "recommended"
    assert {"recommended", "stronger identity", "more variety", "less background leakage", "custom"} <= set(
        PRESET_NAMES)
    schema = SpectralConsistencyPreset.define_schema()
    combo = next(item for item in schema.inputs if item.id == "preset")
    assert list(combo.options) == list(PRESET_NAMES) and combo.default == "recommended"
    assert all(item.tooltip for item in schema.inputs)


@pytest.mark.parametrize("name", [name for name in PRESET_NAMES if name != "custom"])
def test_preset_samples_bit_for_bit_what_its_stated_settings_do(model, family, name):
    steps = BLENDING_STEPS if PRESETS[name].query_blending else STEPS
    vanilla = ksampler(model, family, empty_latent(), steps=steps)
    from_preset = ksampler(preset(model, name), family, empty_latent(), steps=steps)
    explicit = ksampler(by_hand(model, name), family, empty_latent(PRESETS[name].same_noise), steps=steps)
    assert torch.equal(from_preset, explicit)
    # The equality means something only if the settings change the images.
    assert (from_preset - vanilla).abs().max() > 1e-3
    assert torch.equal(ksampler(model, family, empty_latent(), steps=steps), vanilla), "the input MODEL changed"


def test_presets_differ_from_each_other(model, family):
    # 20 steps: below 10, more variety's later start (0.1 of the schedule) falls between the same two steps.
    results = {name: ksampler(preset(model, name), family, empty_latent(), steps=BLENDING_STEPS)
               for name in PRESET_NAMES}
    names = list(results)
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            assert not torch.equal(results[names[first]], results[names[second]]), (names[first], names[second])


def test_stronger_identity_starts_every_image_from_the_first_images_noise(model, family):
    settings = PRESETS["stronger identity"]
    assert settings.same_noise
    # Without sharing, the same noise and the same prompt give the same image: seen through a batch of one prompt.
    positive = [[conditioning(family, 1, 1)[0][0].expand(IMAGES, -1, -1), {
        key: (value.expand(IMAGES, -1) if isinstance(value, torch.Tensor) else value)
        for key, value in conditioning(family, 1, 1)[0][1].items()}]]
    negative = conditioning(family, 1, 99)
    patched = preset(model, "stronger identity", anchors=IMAGES)  # every image an anchor: all see the same
    out = comfy_nodes.common_ksampler(patched, 5, 3, 5.0, "euler", "normal", positive, negative,
                                      empty_latent())[0]["samples"]
    for row in range(1, IMAGES):
        assert torch.allclose(out[row], out[0], atol=1e-5)


def test_stronger_identity_keeps_zero_noise_zero(model, family):
    """KSamplerAdvanced with add_noise off (and DisableNoise) hands the sampler zeros: nothing to copy."""
    import comfy.sample

    latent = torch.randn(IMAGES, *LATENT, generator=torch.Generator().manual_seed(2))
    positive, negative = conditioning(family, IMAGES, 1), conditioning(family, 1, 99)
    runs = [comfy.sample.sample(patched, torch.zeros_like(latent), 3, 5.0, "euler", "normal", positive, negative,
                                latent, denoise=0.5, disable_pbar=True, seed=1)
            for patched in (preset(model, "stronger identity"), by_hand(model, "stronger identity"))]
    assert torch.equal(runs[0], runs[1])


def test_custom_uses_the_connected_spectra(model, family):
    keys = SpectralTruncate.execute("quantile", 0.25).result[0]
    values = SpectralReweight.execute("log", 1.0).result[0]
    custom = ksampler(preset(model, "custom", key_spectrum=keys, value_spectrum=values), family, empty_latent())
    explicit = ksampler(SpectralAnchorAttention.execute(model, 2, "decoder", 0.01, 1.0, key_spectrum=keys,
                                                        value_spectrum=values).result[0], family, empty_latent())
    assert torch.equal(custom, explicit)
    plain = ksampler(preset(model, "custom"), family, empty_latent())
    default = ksampler(SpectralAnchorAttention.execute(model, 2, "decoder", 0.01, 1.0).result[0], family,
                       empty_latent())
    assert torch.equal(plain, default)


def test_anchors_input_reaches_sharing(model, family):
    one = ksampler(preset(model, "recommended", anchors=1), family, empty_latent())
    explicit = ksampler(by_hand(model, "recommended", anchors=1), family, empty_latent())
    assert torch.equal(one, explicit)
    assert not torch.equal(one, ksampler(preset(model, "recommended"), family, empty_latent()))


def test_spectra_connected_to_a_named_preset_are_an_error(model):
    keys = SpectralTruncate.execute("quantile", 0.25).result[0]
    with pytest.raises(ValueError, match=r"Consistent Character .*'key_spectrum'.*preset custom"):
        preset(model, "recommended", key_spectrum=keys)


def test_unknown_preset_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"input 'preset'.*recommended"):
        preset(model, "strongest")


def test_batch_of_one_is_plain_sampling(model, family):
    positive, negative = conditioning(family, 1, 1), conditioning(family, 1, 99)
    latent = {"samples": torch.zeros(1, *LATENT)}
    runs = [comfy_nodes.common_ksampler(m, 3, 3, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
            for m in (model, preset(model, "stronger identity"))]
    assert torch.equal(runs[0], runs[1])


def test_spectrum_plot_draws_a_preset_run(model, family):
    prompt = {"5": {"class_type": "SpectralConsistencyPreset", "inputs": {}},
              "9": {"class_type": "SpectralSpectrumPlot", "inputs": {"model": ["5", 0], "layer": 0}}}
    node = with_hidden(SpectralConsistencyPreset, {io.Hidden.prompt: prompt, io.Hidden.unique_id: "5"})
    patched = node.execute(model, "recommended", 2).result[0]
    samples = ksampler(patched, family, empty_latent(), steps=3)
    image = SpectralSpectrumPlot.execute(patched, {"samples": samples}, 0, -1).result[0]
    assert image.ndim == 4 and image.shape[-1] == 3


@pytest.mark.parametrize("node_class,arguments", [(SpectralConsistencyPreset, ("recommended", 2)),
                                                  (SpectralAnchorAttention, (2, "decoder", 0.01, 1.0))])
def test_a_plot_with_a_linked_layer_arms_every_layer_behind_either_node(model, family, node_class, arguments):
    prompt = {"5": {"class_type": node_class.GET_SCHEMA().node_id, "inputs": {}},
              "6": {"class_type": "SimpleMath", "inputs": {}},
              "9": {"class_type": "SpectralSpectrumPlot", "inputs": {"model": ["5", 0], "layer": ["6", 0]}}}
    node = with_hidden(node_class, {io.Hidden.prompt: prompt, io.Hidden.unique_id: "5"})
    recorder = recorder_of(node.execute(model, *arguments).result[0])
    assert recorder.armed_layers == set(range(len(recorder.layer_keys)))
