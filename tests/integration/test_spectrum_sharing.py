"""Spectrum filters inside anchor sharing, and the spectrum plot, on the real ComfyUI."""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch
from comfy_harness import conditioning, sample, tiny_model
from reference import reference_shared_attention, reference_spectrum_filter

from spectral_anchors.attention.sharing import shared_attention
from spectral_anchors.attention.spectrum import Reweight, Spectrum, Truncate
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.spectrum_node import SpectralReweight, SpectralTruncate
from spectral_anchors.nodes.spectrum_plot_node import SpectralSpectrumPlot, plot_layers_downstream
from spectral_anchors.nodes.spectrum_plot_recording import recorder_of

LATENT = (4, 16, 24)


def patch(model, key_spectrum=None, value_spectrum=None, anchors=2):
    return SpectralAnchorAttention.execute(model, anchors, "decoder", 0.01, 1.0, key_spectrum=key_spectrum,
                                           value_spectrum=value_spectrum).result[0]


@pytest.fixture(scope="module")
def model():
    return tiny_model("sdxl")


def batch(size=4):
    return conditioning("sdxl", size, 1), conditioning("sdxl", 1, 99), torch.zeros(size, *LATENT)


def chain(*steps):
    spectrum = Spectrum()
    for step in steps:
        spectrum = spectrum.then(step)
    return spectrum


def test_nodes_build_chains_in_order():
    first = SpectralReweight.execute("log_squared", 1.0).result[0]
    both = SpectralTruncate.execute("energy", 0.95, spectrum=first).result[0]
    assert repr(both) == "log_squared -> energy(0.95)"
    assert both.steps == (Reweight("log_squared", 1.0), Truncate("energy", 0.95))
    assert repr(first) == "log_squared"  # the earlier chain is untouched


@pytest.mark.parametrize(("node", "kwargs", "message"), [
    (SpectralTruncate, {"mode": "fixed", "value": 2.5}, "whole number"),
    (SpectralTruncate, {"mode": "fixed", "value": 0.0}, "whole number"),
    (SpectralTruncate, {"mode": "quantile", "value": 0.0}, "0 < q <= 1"),
    (SpectralTruncate, {"mode": "energy", "value": 1.5}, "0 < q <= 1"),
    (SpectralReweight, {"mode": "exp", "alpha": 11.0}, "between"),
])
def test_bad_values_get_clear_errors_at_queue_time(node, kwargs, message):
    result = node.validate_inputs(**kwargs)
    assert isinstance(result, str) and message in result and node.__name__.replace("Spectral", "Spectral ") in result


def test_each_anchor_is_decomposed_once_per_layer_call():
    calls = []

    def counting_filter(x):
        calls.append(x.shape[0])
        return x * 0.5

    q, k, v = (torch.randn(2 * 5, 12, 8) for _ in range(3))
    shared_attention(q, k, v, chunk_count=2, anchor_count=2, attend=lambda a, b, c: a,
                     key_filter=counting_filter, value_filter=counting_filter)
    assert calls == [4, 4]  # K then V, each one batch of chunks x anchors, whatever the number of targets


@pytest.mark.parametrize("steps", [
    [("truncate", "quantile", 0.25)],
    [("reweight", "log_squared", 1.0), ("truncate", "energy", 0.95)],
    [("reweight", "exp", 2.0)],
])
def test_filtered_sharing_matches_the_reference_on_one_layer(steps):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2 * 4, 24, 32, generator=generator) * 3 for _ in range(3))
    ours_filter = chain(*[Truncate(m, x) if kind == "truncate" else Reweight(m, x) for kind, m, x in steps])
    reference_filter = reference_spectrum_filter(steps)

    def attend(qq, kk, vv):
        return comfy_attention.optimized_attention(qq, kk, vv, 4)

    ours = shared_attention(q, k, v, 2, 2, attend, key_filter=ours_filter, value_filter=ours_filter)
    reference = reference_shared_attention(q, k, v, [1, 0], 2, attend, key_filter=reference_filter,
                                           value_filter=reference_filter)
    unfiltered = shared_attention(q, k, v, 2, 2, attend)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5)
    assert (ours - unfiltered).abs().max() > 100 * (ours - reference).abs().max()


def test_identity_chains_reproduce_unfiltered_sharing(model):
    positive, negative, latent = batch()
    unfiltered = sample(patch(model), positive, negative, latent)
    for identity in (chain(Truncate("fixed", 4096)), chain(Truncate("energy", 1.0))):
        filtered = sample(patch(model, identity, identity), positive, negative, latent)
        assert torch.allclose(filtered, unfiltered, rtol=1e-4, atol=1e-4 * unfiltered.abs().max())


def test_filtering_changes_targets_but_anchors_never_depend_on_targets(model):
    positive, negative, latent = batch()
    spectrum = chain(Reweight("log_squared"), Truncate("quantile", 0.05))
    patched = patch(model, spectrum, spectrum)
    unfiltered = sample(patch(model), positive, negative, latent)
    filtered = sample(patched, positive, negative, latent)
    assert (filtered - unfiltered).abs().max() > 1e-4 * unfiltered.abs().max()

    noise = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(8))
    base = sample(patched, positive, negative, latent, noise=noise)
    other_noise = noise.clone()
    other_noise[2:] = torch.randn_like(other_noise[2:])
    other_positive = [[positive[0][0].clone(), dict(positive[0][1])]]
    other_positive[0][0][2:] += 1.0
    changed = sample(patched, other_positive, negative, latent, noise=other_noise)
    assert torch.allclose(changed[:2], base[:2], rtol=1e-5, atol=1e-6 * base.abs().max())
    assert not torch.allclose(changed[2:], base[2:])


def plot_prompt(attention_id="3"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        attention_id: {"class_type": "SpectralAnchorAttention", "inputs": {"model": ["1", 0]}},
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [attention_id, 0]}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "SpectralSpectrumPlot", "inputs": {"model": ["4", 0], "samples": ["5", 0], "layer": 2}},
        "7": {"class_type": "SpectralSpectrumPlot", "inputs": {"model": ["1", 0], "samples": ["5", 0], "layer": 1}},
    }


def test_plot_requests_are_traced_through_model_patches():
    assert plot_layers_downstream(plot_prompt(), "3") == {2}
    assert plot_layers_downstream(plot_prompt(), "9") == set()
    assert plot_layers_downstream(None, "3") == set()


def test_plot_draws_a_recorded_run(model):
    positive, negative, latent = batch()
    spectrum = chain(Truncate("quantile", 0.25))
    patched = patch(model, spectrum, spectrum)
    recorder = recorder_of(patched)
    assert recorder is not None and not recorder.armed_layers  # nothing recorded unless a plot asks
    with pytest.raises(ValueError, match="Recording is now on"):
        SpectralSpectrumPlot.execute(patched, {"samples": latent}, 1, -1)
    samples = sample(patched, positive, negative, latent, steps=4)
    recorded = recorder.records[1]
    assert sorted(recorded) == [1, 2, 3]  # the first step stays plain
    spectra = recorded[3]
    for kind in ("K", "V"):
        before, after = spectra.before[kind], spectra.after[kind]
        assert before.shape[0] == 2 and before.shape == after.shape
        kept = int((after > 1e-6 * after.max()).sum(dim=1).max())
        assert kept == -(-before.shape[1] // 4)  # quantile 0.25 keeps ceil(r / 4)
        assert torch.all(before[:, :-1] >= before[:, 1:])
    image = SpectralSpectrumPlot.execute(patched, {"samples": samples}, 1, -1).result[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 300
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    orange = (image[..., 0] > 0.85) & (image[..., 1] > 0.35) & (image[..., 1] < 0.5) & (image[..., 2] < 0.15)
    assert int(orange.sum()) > 200  # the "after" curves are drawn
    with pytest.raises(ValueError, match="input 'layer'"):
        SpectralSpectrumPlot.execute(patched, {"samples": samples}, 40, -1)
    with pytest.raises(ValueError, match="input 'step'"):
        SpectralSpectrumPlot.execute(patched, {"samples": samples}, 1, 0)


def test_plot_on_an_unpatched_model_explains_what_to_connect(model):
    with pytest.raises(ValueError, match="no Spectral Anchor Attention"):
        SpectralSpectrumPlot.execute(model, {"samples": torch.zeros(1, *LATENT)}, 0, -1)
