"""Spectral Spectrum Plot names each layer's real token grid, at any latent size (not SDXL's 1024 px grids)."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import conditioning, sample

from spectral_anchors.nodes.unet_layout import layer_token_grid, self_attention_layers, unet_of


@pytest.mark.parametrize("latent_size", [(16, 24), (13, 9)])
def test_layer_grid_matches_the_tokens_each_layer_sees(model, family, latent_size):
    seen = {}

    def recording(key):
        def attention(q, k, v, extra_options):
            seen[key] = q.shape[1]
            import comfy.ldm.modules.attention as comfy_attention
            return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return attention

    unet = unet_of(model)
    patched = model.clone()
    layers = self_attention_layers(unet)
    for key in layers:
        patched.set_model_attn1_replace(recording(key), *key)
    latent = torch.zeros(1, 4, *latent_size)
    sample(patched, conditioning(family, 1), conditioning(family, 1, 9), latent, steps=1)
    assert set(seen) == set(layers)
    for key in layers:
        rows, columns = layer_token_grid(unet, key, *latent_size)
        assert rows * columns == seen[key], key
