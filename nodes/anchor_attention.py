"""How a MODEL clone gets anchor-shared self-attention: one attn1 replacement per UNet block with selected layers.

The replacements use ComfyUI's 2-part key (block name, block id), which serves every transformer of that block.
ComfyUI looks an attn1 replacement up by the 3-part key (block name, block id, index) first and by the 2-part key
second, so any other node's replacement wins on its layers: a 3-part one set before or after this node, a 2-part
one set later (it takes the same key), or one set only for a single forward, as core PAG does in its own pass.
A 2-part replacement already on the model keeps its block: this node leaves it alone and logs a warning once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import comfy.ldm.modules.attention as comfy_attention
from comfy.patcher_extension import WrappersMP

from ..attention.schedule import SigmaWindow
from ..attention.sharing import shared_attention
from ..attention.spectrum import SolverState, filter_groups_with_values
from .anchor_attention_masks import install_subject_masks, subject_anchor_keep
from .anchor_attention_query_blend import blended_queries, install_query_blending, record_queries, recording_queries
from .run_context import (
    SOLVER_SCRATCH_KEY,
    SPECTRUM_SETTLE_WRAPPER,
    PackPatcher,
    call_of,
    run_of,
    solver_state_of,
)
from .sampling_run import fresh_control, track_sampling_runs
from .spectrum_plot_recording import SpectrumRecorder
from .story_runs import track_story_runs
from .unet_layout import LayerKey, blocks_of, selected_layers, unet_of

if TYPE_CHECKING:
    from .story import Story


@dataclass(frozen=True)
class SharingPlan:
    """What the SpectralAnchorAttention node asked for. Later options get defaults that keep old behaviour."""

    anchor_count: int
    layers: str
    start_percent: float
    end_percent: float
    key_spectrum: object | None = None
    value_spectrum: object | None = None
    # ConsiStory's subject masks (nodes/anchor_attention_masks.py): anchors share only their subject tokens, minus
    # dropout.
    subject_masks: bool = False
    mask_dropout: float = 0.5
    mask_seed: int = 0
    story: Story | None = None
    # ConsiStory's query blending (nodes/anchor_attention_query_blend.py): s on the first and the last blending step.
    query_blend: bool = False
    query_blend_weights: tuple[float, float] = (0.9, 0.82)

    @property
    def window_is_empty(self) -> bool:
        return self.end_percent <= self.start_percent


def apply_sharing(model_patcher, plan: SharingPlan):
    """A clone of `model_patcher` whose selected self-attention layers share the anchors' keys and values."""
    unet = unet_of(model_patcher)
    layers = selected_layers(unet, plan.layers)
    patched = model_patcher.clone()
    if plan.window_is_empty:
        return patched  # nothing to do: the clone computes exactly what the input does
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    taken = [key for key in layers if key in existing or key[:2] in existing]
    if taken:
        logging.warning("SpectralAnchorAttention: another node already replaces self-attention on %s; "
                        "those layers are left to it.", ", ".join(map(str, taken)))
    track_sampling_runs(patched)
    track_story_runs(patched, plan.anchor_count, plan.story)
    pack = PackPatcher(patched)
    pack.set_sharing_plan(plan)
    model_sampling = patched.get_model_object("model_sampling")
    window = SigmaWindow(model_sampling.percent_to_sigma(plan.start_percent),
                         model_sampling.percent_to_sigma(plan.end_percent))
    if plan.subject_masks:
        if plan.story is None:
            raise ValueError("subject masks need a story (the subject's token positions per scene)")
        install_subject_masks(patched, plan.story, plan.mask_dropout, plan.mask_seed)
    if plan.query_blend:
        install_query_blending(patched, window, plan.query_blend_weights)
    if _filter_of(plan.key_spectrum) is not None or _filter_of(plan.value_spectrum) is not None:
        pack.install_wrapper(WrappersMP.APPLY_MODEL, SPECTRUM_SETTLE_WRAPPER, _settle_spectra)
    recorder = SpectrumRecorder(layers)
    pack.set_spectrum_recorder(recorder)
    layer_indices = {key: index for index, key in enumerate(layers)}
    for block in blocks_of(layers):
        if block not in existing:
            patched.set_model_attn1_replace(_make_block_patch(plan, window, block, layer_indices, recorder), *block)
    return patched


def _make_block_patch(plan: SharingPlan, window: SigmaWindow, block: tuple[str, int],
                      layer_indices: dict[LayerKey, int], recorder: SpectrumRecorder):
    key_filter = _filter_of(plan.key_spectrum)
    value_filter = _filter_of(plan.value_spectrum)

    def shared_self_attention(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q_part, k_part, v_part):
            # Looked up at call time so the user's backend (and any override another node installs) is used.
            return comfy_attention.optimized_attention(q_part, k_part, v_part, heads,
                                                       attn_precision=extra_options.get("attn_precision"),
                                                       transformer_options=extra_options)

        layer = (*block, extra_options.get("block_index", 0))
        layer_index = layer_indices.get(layer)
        if layer_index is None:
            return attend(q, k, v)
        call = call_of(extra_options)
        sigma = call.sigma if call is not None else float(extra_options["sigmas"].max())
        if not window.contains(sigma):
            return attend(q, k, v)
        if plan.query_blend:
            if recording_queries(extra_options):
                record_queries(extra_options, layer, q)
                return attend(q, k, v)  # the plain forward of query blending
            q = blended_queries(extra_options, layer, q)
        # Layers a plot asked for are decomposed fully so the plot sees every singular value; the others take
        # the batched filter path (iterative top-k where the chain allows), which records the values it computes.
        keys_filter, values_filter, pair_filter = key_filter, value_filter, None
        cond_or_uncond = extra_options["cond_or_uncond"]
        if recorder.wants(layer_index):
            keys_filter = recorder.recording_filter(key_filter, "K", layer_index, call, cond_or_uncond)
            values_filter = recorder.recording_filter(value_filter, "V", layer_index, call, cond_or_uncond)
        elif key_filter is not None or value_filter is not None:
            slot = (layer_index, tuple(cond_or_uncond))

            def keep(kind, spectrum, before, after):
                recorder.keep(kind, spectrum, layer_index, call, cond_or_uncond, before, after)

            pair_filter = _pair_filter(key_filter, value_filter, _solver_state(call), slot, keep)
        anchor_keep = subject_anchor_keep(plan.anchor_count, q, extra_options) if plan.subject_masks else None
        return shared_attention(q, k, v, chunk_count=len(cond_or_uncond),
                                anchor_count=plan.anchor_count, attend=attend,
                                key_filter=keys_filter, value_filter=values_filter, anchor_keep=anchor_keep,
                                pair_filter=pair_filter)

    return shared_self_attention


def _filter_of(spectrum):
    if spectrum is None or getattr(spectrum, "is_identity", False):
        return None
    return spectrum


def _solver_state(call) -> SolverState | None:
    """The run's solver state; None outside a sampling run (each filter call then checks itself)."""
    if call is None or call.run is None:
        return None
    return call.run.scratch.setdefault(SOLVER_SCRATCH_KEY, SolverState())


def _pair_filter(key_filter, value_filter, state: SolverState | None, slot, keep):
    """K and V of all anchors and chunks of one layer call, filtered in as few batched decompositions as their
    chains allow, with no host sync; convergence is settled by _settle_spectra once per model call. The singular
    values the decompositions computed go to keep(kind, spectrum, before, after) for the spectrum plot."""

    def filter_both(keys, values):
        filtered_keys, filtered_values = filter_groups_with_values([(key_filter, keys), (value_filter, values)],
                                                                   state=state, slot=slot)
        keep("K", key_filter, filtered_keys.before, filtered_keys.after)
        keep("V", value_filter, filtered_values.before, filtered_values.after)
        return filtered_keys.x, filtered_values.x

    return filter_both


def _settle_spectra(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
    """Run the model call, then read every spectrum solve's convergence flag and rebuild need once (one host sync
    per call). A layer whose iterative solve did not converge switches to the full decomposition for the rest of
    the run, a full-route rebuild that needed more columns than the previous step's takes them, and the call is
    redone, so no inexact result ever reaches the sampler."""
    run = run_of(transformer_options or {})
    state = solver_state_of(run)
    if state is not None:
        state.discard_pending()
    out = executor(x, t, c_concat, c_crossattn, fresh_control(control), transformer_options, **kwargs)
    state = solver_state_of(run)
    while state is not None:
        failed = state.settle()
        if not failed:
            break
        logging.info("SpectralAnchorAttention: %d spectrum solve(s) were not exact (an iterative solve that did not "
                     "converge, or a rebuild that needed more columns than the last step's); redoing the model call "
                     "with the full decomposition or width on those layers.", len(failed))
        out = executor(x, t, c_concat, c_crossattn, fresh_control(control), transformer_options, **kwargs)
    return out
