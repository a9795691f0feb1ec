"""How a MODEL clone gets anchor-shared self-attention: one attn1 replacement per selected layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention

from ..attention.schedule import SigmaWindow
from ..attention.sharing import shared_attention
from .sampling_run import call_of, track_sampling_runs
from .unet_layers import LayerKey, selected_layers, unet_of

PLAN_KEY = "spectral_anchors.sharing_plan"


@dataclass(frozen=True)
class SharingPlan:
    """What the SpectralAnchorAttention node asked for. Later options get defaults that keep old behaviour."""

    anchor_count: int
    layers: str
    start_percent: float
    end_percent: float
    key_spectrum: object | None = None
    value_spectrum: object | None = None

    @property
    def window_is_empty(self) -> bool:
        return self.end_percent <= self.start_percent


def sharing_plan_of(model_patcher) -> SharingPlan | None:
    """The plan a SpectralAnchorAttention node attached to this MODEL, for nodes that build on it."""
    return model_patcher.get_attachment(PLAN_KEY)


def apply_sharing(model_patcher, plan: SharingPlan):
    """A clone of `model_patcher` whose selected self-attention layers share the anchors' keys and values."""
    unet = unet_of(model_patcher)
    layers = selected_layers(unet, plan.layers)
    patched = model_patcher.clone()
    if plan.window_is_empty:
        return patched  # nothing to do: the clone computes exactly what the input does
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    taken = [key for key in layers if key in existing]
    if taken:
        logging.warning("SpectralAnchorAttention: another node already replaces self-attention on %s; "
                        "those layers are left to it.", ", ".join(map(str, taken)))
    track_sampling_runs(patched)
    patched.set_attachments(PLAN_KEY, plan)
    model_sampling = patched.get_model_object("model_sampling")
    window = SigmaWindow(model_sampling.percent_to_sigma(plan.start_percent),
                         model_sampling.percent_to_sigma(plan.end_percent))
    for key in layers:
        if key not in taken:
            patched.set_model_attn1_replace(_make_layer_patch(plan, window, key), *key)
    return patched


def _make_layer_patch(plan: SharingPlan, window: SigmaWindow, layer: LayerKey):
    key_filter = _filter_of(plan.key_spectrum)
    value_filter = _filter_of(plan.value_spectrum)

    def shared_self_attention(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q_part, k_part, v_part):
            # Looked up at call time so the user's backend (and any override another node installs) is used.
            return comfy_attention.optimized_attention(q_part, k_part, v_part, heads,
                                                       attn_precision=extra_options.get("attn_precision"),
                                                       transformer_options=extra_options)

        call = call_of(extra_options)
        sigma = call.sigma if call is not None else float(extra_options["sigmas"].max())
        if not window.contains(sigma):
            return attend(q, k, v)
        return shared_attention(q, k, v, chunk_count=len(extra_options["cond_or_uncond"]),
                                anchor_count=plan.anchor_count, attend=attend,
                                key_filter=key_filter, value_filter=value_filter)

    shared_self_attention.layer = layer  # lets tests and tools see which layer a patch serves
    return shared_self_attention


def _filter_of(spectrum):
    if spectrum is None or getattr(spectrum, "is_identity", False):
        return None
    return spectrum
