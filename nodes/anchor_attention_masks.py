"""Subject masks on a MODEL clone: read the subject word's cross-attention, hand the anchors' masked tokens out.

Reading does not replace cross-attention. An attn2_patch sees each layer's (normalised) hidden states and context
before the projection, and computes the probabilities itself with that layer's own to_q / to_k, so an attn2
replacement another node installs (IPAdapter does) still runs unchanged. The patch works only on the layers of
the coarsest attention grid, only on the cond chunk (its mask serves both chunks), and only exists when masks are
on: with masks off nothing is installed and the images are bit-identical to before.

The mask state (attention/masks.py SubjectMaskHistory) lives in the SamplingRun's scratch, so it starts empty
with every run and is dropped when the run ends. The UNet itself reaches the patch through a DIFFUSION_MODEL
wrapper (its executor's class_obj is the UNet being run), so the modules are those of the model actually sampled.

Until the cross-attention of one step has been read (only when sharing starts at step 0), there is no mask and
anchors contribute all their tokens, exactly as without masks; from then on, the mask of the steps before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from comfy.patcher_extension import WrappersMP

from ..attention.grid import token_grid
from ..attention.masks import SubjectMaskHistory, subject_token_probabilities
from ..attention.sharing import anchor_count_in_chunk
from .anchor_attention_query_blend import recording_queries
from .run_context import (
    MASKS_SCRATCH_KEY,
    SUBJECT_MASKS_WRAPPER,
    UNET_KEY,
    PackPatcher,
    call_of,
    mask_history_of,
    unet_of_call,
    with_entry,
)
from .sampling_run import SamplingRun
from .story_runs import rows_of_story
from .unet_layout import cross_attention_module, layer_of_call, layout_of

NODE_NAME = "Spectral Anchor Attention"


def story_tokens_for_batch(story, images: int) -> tuple[tuple[int, ...], ...]:
    """The subject token positions of each image of a cond chunk: one scene per image (or one for all)."""
    scenes = len(story.subject_tokens)
    if scenes == images:
        return tuple(story.subject_tokens)
    if scenes == 1:
        return tuple(story.subject_tokens) * images
    raise ValueError(
        f"{NODE_NAME}, input 'story': the story has {scenes} scenes but the sampler's batch has {images} images. "
        "Feed the sampler the positive conditioning and the latent of the same Spectral Story Prompts node whose "
        "story is connected here.")


def _history_of(run: SamplingRun, subject_tokens: Sequence[Sequence[int]], dropout: float,
                seed: int) -> SubjectMaskHistory:
    history = mask_history_of(run)
    if history is None or history.image_count != len(subject_tokens):
        history = SubjectMaskHistory(subject_tokens, dropout=dropout, seed=seed)
        run.scratch[MASKS_SCRATCH_KEY] = history
    return history


def _copies_per_image(story, images: int, context_tokens: int) -> torch.Tensor:
    """How often each row's own tokens repeat in a context of `context_tokens` (rows are repeated to batch).

    Every copy of a token gets the same probability, so the subject's attention is the first copy's times this.
    """
    lengths = tuple(getattr(story, "sequence_lengths", ()) or ())
    if len(lengths) == 1:
        lengths = lengths * images
    if len(lengths) != images:
        return torch.ones(images)
    return torch.tensor([context_tokens // length if length and context_tokens % length == 0 else 1
                         for length in lengths], dtype=torch.float32)


def install_subject_masks(model_patcher, story_of_plan, dropout: float, seed: int) -> None:
    """Register the cross-attention reader (attn2_patch) and the wrapper that hands it the UNet, on a clone."""
    coarsest = layout_of(model_patcher.model.diffusion_model).coarsest_cross_attention_layers

    def expose_unet(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        transformer_options = with_entry(transformer_options, UNET_KEY, executor.class_obj)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def read_subject_attention(n, context, value, extra_options):
        layer = layer_of_call(extra_options)
        if layer is None or context is None:
            return n, context, value
        call = call_of(extra_options)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        unet = unet_of_call(extra_options)
        if (layer not in coarsest or call is None or call.run is None or unet is None or 0 not in cond_or_uncond
                or recording_queries(extra_options)):
            return n, context, value
        per_chunk = n.shape[0] // len(cond_or_uncond)
        first = cond_or_uncond.index(0) * per_chunk
        story = rows_of_story(story_of_plan, extra_options)  # a split story's rows of the run being sampled
        cond_context = context if context.shape[0] == n.shape[0] else context.expand(n.shape[0], -1, -1)
        cond_context = cond_context[first:first + per_chunk]
        history = _history_of(call.run, story_tokens_for_batch(story, per_chunk), dropout, seed)
        if int(history.token_index.max()) >= cond_context.shape[1]:
            raise ValueError(
                f"{NODE_NAME}, input 'story': the subject's token positions reach beyond the {cond_context.shape[1]} "
                "tokens of the positive conditioning. Feed the sampler the positive conditioning of the same "
                "Spectral Story Prompts node whose story is connected here.")
        attention = cross_attention_module(unet, layer)
        q = attention.to_q(n[first:first + per_chunk])
        k = attention.to_k(cond_context)
        maps = subject_token_probabilities(q, k, extra_options["n_heads"], history.token_index)
        maps = maps * _copies_per_image(story, per_chunk, cond_context.shape[1]).to(maps.device)[:, None, None]
        shape = extra_options["original_shape"]
        history.record(call.step, maps, token_grid(shape[-2], shape[-1], n.shape[1]))
        return n, context, value

    PackPatcher(model_patcher).install_wrapper(WrappersMP.DIFFUSION_MODEL, SUBJECT_MASKS_WRAPPER, expose_unet)
    model_patcher.set_model_attn2_patch(read_subject_attention)


def subject_anchor_keep(anchor_count: int, q: torch.Tensor, extra_options: dict) -> list[torch.Tensor] | None:
    """The tokens each anchor contributes to other images in this layer and step, or None (all tokens).

    The cond chunk's mask serves every chunk, so the same indices go to the uncond chunk.
    """
    call = call_of(extra_options)
    history = mask_history_of(call.run) if call is not None else None
    if history is None:
        return None
    per_chunk = q.shape[0] // len(extra_options["cond_or_uncond"])
    anchors = anchor_count_in_chunk(anchor_count, per_chunk)
    if anchors == 0 or history.image_count != per_chunk:
        return None
    shape = extra_options["original_shape"]
    return history.anchor_keep(call.step, token_grid(shape[-2], shape[-1], q.shape[1]), anchors)
