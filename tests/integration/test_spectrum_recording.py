"""Spectrum recording on the real ComfyUI.

Filtered keys and values are recorded in every run, so a plot added after a run draws at once (the fast solver's
leading values where it computes no more); a plot fed by a linked `layer` arms every layer (or the primitive's value)
for full spectra; samplers on clones of one patched model keep their own records; and nothing is decomposed for
recording when no plot asks for an unfiltered matrix.
"""

from __future__ import annotations

import pytest
import torch
from comfy_api.latest import io
from comfy_harness import conditioning, sample, tiny_model, with_hidden
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_anchors.attention.spectrum import Spectrum, Truncate
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.spectrum_plot_node import ALL_LAYERS, SpectralSpectrumPlot, plot_layers_downstream
from spectral_anchors.nodes.spectrum_plot_recording import recorder_of

LATENT = (4, 8, 12)
QUARTER = Spectrum().then(Truncate("quantile", 0.25))


@pytest.fixture(scope="module")
def model():
    return tiny_model("sdxl")


def batch(size=3, seed=1):
    return conditioning("sdxl", size, seed), conditioning("sdxl", 1, 99), torch.zeros(size, *LATENT)


def attention(model, prompt=None, node_id="3", **spectra):
    """SpectralAnchorAttention as the executor runs it, with the hidden prompt and node id it would see."""
    node = with_hidden(SpectralAnchorAttention, {io.Hidden.prompt: prompt or {}, io.Hidden.unique_id: node_id})
    return SpectralAnchorAttention.execute.__func__(node, model, 2, "decoder", 0.01, 1.0, **spectra).result[0]


def plot_prompt(layer):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 2}},
        "3": {"class_type": "SpectralAnchorAttention", "inputs": {"model": ["1", 0]}},
        "4": {"class_type": "SimpleMath", "inputs": {"a": ["2", 0]}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["3", 0]}},
        "6": {"class_type": "SpectralSpectrumPlot", "inputs": {"model": ["3", 0], "samples": ["5", 0],
                                                               "layer": layer}},
    }


def test_a_plot_added_after_the_run_draws_the_filtered_spectra_at_once(model):
    # No plot in the prompt: every layer takes the batched filter path, which keeps the values it computes, so a
    # plot added afterwards draws without sampling again (ComfyUI would serve the sampler from its cache).
    patched = attention(model, key_spectrum=QUARTER, value_spectrum=QUARTER)
    positive, negative, latent = batch()
    with Decompositions() as decompositions:
        samples = sample(patched, positive, negative, latent, steps=3)
    image = SpectralSpectrumPlot.execute(patched, {"samples": samples}, 1, -1).result[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3
    recorder = recorder_of(patched)
    assert not recorder.armed_layers
    spectra = recorder.spectra_for(patched).records[1][2]
    for kind in ("K", "V"):
        before, after = spectra.before[kind], spectra.after[kind]
        assert before.shape[0] == 2 and before.device.type == "cpu"
        assert torch.isfinite(before).all()  # these small matrices take the full decomposition: every value
        kept = (after > 1e-6 * after.max()).sum(dim=1)
        assert kept.tolist() == [-(-before.shape[1] // 4)] * 2
    # Recording added no decomposition: one per layer call that shares (2 chunk layouts x 2 steps x 4 layers at
    # most), K and V batched together.
    assert decompositions.count <= 2 * 2 * len(recorder.layer_keys)


def test_the_fast_solver_records_its_block_and_a_fallback_the_whole_spectrum(model, caplog):
    # decoder+middle on a 40 x 40 latent: the middle layer sees 10 x 10 tokens of 128 channels, where fixed 1 takes
    # the iterative top-k solver (a block of 17 of 100 values). The tiny random UNet's keys have a flat spectrum, so
    # a solve may fail its residual check: the model call is then redone with the full decomposition, whose values
    # (all of them) are what the run records for that step.
    node = with_hidden(SpectralAnchorAttention, {io.Hidden.prompt: {}, io.Hidden.unique_id: "3"})
    first = Spectrum().then(Truncate("fixed", 1))
    patched = SpectralAnchorAttention.execute.__func__(node, model, 2, "decoder+middle", 0.01, 1.0,
                                                       key_spectrum=first).result[0]
    assert first.uses_topk(100, 128)
    positive, negative = conditioning("sdxl", 3, 1), conditioning("sdxl", 1, 99)
    with caplog.at_level("INFO"):
        samples = sample(patched, positive, negative, torch.zeros(3, 4, 40, 40), steps=3)
    assert "were not exact" in caplog.text and "redoing the model call" in caplog.text
    recorder = recorder_of(patched)
    assert recorder.layer_keys[0][0] == "middle"
    routes = {}
    for step, spectra in recorder.spectra_for(patched).records[0].items():
        before, after = spectra.before["K"], spectra.after["K"]
        assert before.shape == (2, 100)
        computed = torch.isfinite(before).sum(dim=1)
        for row, count in enumerate(computed.tolist()):  # a leading block, NaN after it
            assert torch.isnan(before[row, count:]).all() and torch.isfinite(after[row, :count]).all()
        assert ((after > 0).sum(dim=1) == 1).all() and torch.equal(after[:, 0], before[:, 0])
        assert "V" not in spectra.before  # unfiltered and no plot asked: not decomposed
        routes[step] = "full" if (computed == 100).all() else "topk"
        assert routes[step] == "full" or (computed <= 17).all()
    # This seed's run has both: step 1's cold solve is certified (the certified leading values of its block of 17
    # recorded, the rest NaN); step 2's warm one is not, and the redone call's full decomposition records all 100.
    assert routes == {1: "topk", 2: "full"}
    assert torch.isfinite(samples).all()
    for step in (1, 2):
        image = SpectralSpectrumPlot.execute(patched, {"samples": samples}, 0, step).result[0]
        assert image.shape[0] == 1 and float(image.std()) > 0


def test_a_linked_layer_arms_every_layer_or_the_primitives_value(model):
    assert plot_layers_downstream(plot_prompt(["4", 0]), "3") == {ALL_LAYERS}
    assert plot_layers_downstream(plot_prompt(["2", 0]), "3") == {2}
    positive, negative, latent = batch()
    linked = attention(model, plot_prompt(["4", 0]))  # no filters: recording needs its own decomposition
    sample(linked, positive, negative, latent, steps=3)
    recorder = recorder_of(linked)
    assert set(recorder.spectra_for(linked).records) == set(range(len(recorder.layer_keys)))
    for layer in (0, len(recorder.layer_keys) - 1):
        SpectralSpectrumPlot.execute(linked, {"samples": latent}, layer, -1)
    primitive = attention(model, plot_prompt(["2", 0]))
    sample(primitive, positive, negative, latent, steps=3)
    assert set(recorder_of(primitive).spectra_for(primitive).records) == {2}


def test_samplers_on_clones_of_one_patched_model_keep_their_own_records(model):
    patched = attention(model, plot_prompt(1), value_spectrum=QUARTER)  # a plot of layer 1 downstream
    first, second = patched.clone(), patched.clone()  # e.g. two LoRA loaders after one attention node
    positive, negative, latent = batch(seed=1)
    sample(first, positive, negative, latent, steps=3, seed=1)
    recorder = recorder_of(patched)
    first_values = recorder.spectra_for(first).records[1][2].before["V"].clone()
    other_positive, _, _ = batch(seed=7)
    sample(second, other_positive, negative, latent, steps=3, seed=2)
    second_values = recorder.spectra_for(second).records[1][2].before["V"]
    assert torch.equal(recorder.spectra_for(first).records[1][2].before["V"], first_values)
    assert not torch.allclose(first_values, second_values)
    # A plot on the attention node's own output (not sampled itself) shows the latest run.
    assert recorder.spectra_for(patched) is recorder.spectra_for(second)


class Decompositions(TorchDispatchMode):
    """Counts the aten SVD and symmetric eigendecomposition ops run while the mode is on."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "svd" in name or "eigh" in name:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_nothing_is_decomposed_for_recording_when_no_plot_asks(model):
    positive, negative, latent = batch()
    patched = attention(model)  # sharing without filters, no plot in the prompt
    with Decompositions() as decompositions:
        sample(patched, positive, negative, latent, steps=3)
    assert decompositions.count == 0
    assert recorder_of(patched).spectra_for(patched) is None
    with pytest.raises(ValueError, match="Recording is now on"):
        SpectralSpectrumPlot.execute(patched, {"samples": latent}, 1, -1)
    with Decompositions() as decompositions:  # the plot armed its layer: the next run records it
        sample(patched, positive, negative, latent, steps=3)
    assert decompositions.count > 0
    assert set(recorder_of(patched).spectra_for(patched).records) == {1}
