"""Spectrum recording on the real ComfyUI.

A plot fed by a linked `layer` arms every layer (or the primitive's value); a plot added after a run arms its layer
for the next run; samplers on clones of one patched model keep their own records; and nothing is
decomposed for recording when no plot asks for an unfiltered matrix.
"""

from __future__ import annotations

import pytest
import torch
from comfy_api.latest import io
from comfy_harness import conditioning, sample, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_anchors.attention.spectrum import Spectrum, Truncate
from spectral_anchors.nodes.attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.spectrum_plot_node import ALL_LAYERS, SpectralSpectrumPlot, plot_layers_downstream
from spectral_anchors.nodes.spectrum_recording import recorder_of

LATENT = (4, 8, 12)
QUARTER = Spectrum().then(Truncate("quantile", 0.25))


@pytest.fixture(scope="module")
def model():
    return tiny_model("sdxl")


def batch(size=3, seed=1):
    return conditioning("sdxl", size, seed), conditioning("sdxl", 1, 99), torch.zeros(size, *LATENT)


def attention(model, prompt=None, node_id="3", **spectra):
    """SpectralAnchorAttention as the executor runs it, with the hidden prompt and node id it would see."""
    node = SpectralAnchorAttention.PREPARE_CLASS_CLONE({io.Hidden.prompt: prompt or {}, io.Hidden.unique_id: node_id})
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


def test_a_plot_added_after_the_run_arms_its_layer_and_the_next_run_draws(model):
    # Layers no plot asked for take the batched top-k filter path, which never computes the whole spectrum, so a
    # plot added after a run has nothing to draw yet: it arms its layer and the next run records it.
    patched = attention(model, key_spectrum=QUARTER, value_spectrum=QUARTER)  # no plot in the prompt
    positive, negative, latent = batch()
    samples = sample(patched, positive, negative, latent, steps=3)
    with pytest.raises(ValueError, match="Recording is now on"):
        SpectralSpectrumPlot.execute(patched, {"samples": samples}, 1, -1)
    samples = sample(patched, positive, negative, latent, steps=3)
    image = SpectralSpectrumPlot.execute(patched, {"samples": samples}, 1, -1).result[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3
    spectra = recorder_of(patched).spectra_for(patched).records[1][2]
    kept = int((spectra.after["V"] > 1e-6 * spectra.after["V"].max()).sum(dim=1).max())
    assert kept == -(-spectra.before["V"].shape[1] // 4)
    assert spectra.before["V"].device.type == "cpu"


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
