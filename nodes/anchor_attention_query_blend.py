"""Query blending on a MODEL clone: a plain forward first on the early steps, its queries mixed into the shared layers.

A DIFFUSION_MODEL wrapper (installed only when query blending is on) checks each model call: on a step that both
shares (the sharing window contains its sigma) and lies in the first n/10 steps, it runs the UNet twice.
1. "record": every sharing layer attends plainly, as if the node were absent, and stores its queries in a dict
   that lives only for this model call (in the call's transformer_options). This forward's output is discarded.
2. "blend": every sharing layer replaces its queries by s Q_plain + (1 - s) Q and shares as usual; this output
   is the model's output.
All other calls run once, untouched: only the blending steps pay for the extra forward, and the first step, plain
under the default start_percent, needs none. Other nodes' patches see both forwards; per-call state of ours (mask
reading) skips the recording forward.

The UNet consumes some of its inputs: ControlNet and T2I-Adapter residuals arrive as lists in `control`, and
ComfyUI's apply_control pops one entry per block as it adds it. The plain forward therefore gets its own copy of
those lists, so the kept forward still receives every residual (core PAG gets the same effect by running its
extra forward through calc_cond_batch with copied model options).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy.patcher_extension import WrappersMP
from torch import Tensor

from ..attention.query_blend import blend_queries, query_blend_weight
from ..attention.schedule import SigmaWindow
from .run_context import QUERY_BLEND_KEY, QUERY_BLEND_WRAPPER, PackPatcher, call_of, query_blend_pass_of, with_entry
from .sampling_run import fresh_control
from .unet_layout import LayerKey


@dataclass
class QueryBlendPass:
    """Which of the two forwards of a blending call this is, its weight s, and the plain queries per layer."""

    recording: bool
    weight: float
    queries: dict[LayerKey, Tensor] = field(default_factory=dict)


def recording_queries(options: dict) -> bool:
    """True inside the plain forward that only records queries: layers must behave as without the pack."""
    blend_pass = query_blend_pass_of(options)
    return blend_pass is not None and blend_pass.recording


def record_queries(options: dict, layer: LayerKey, q: Tensor) -> None:
    query_blend_pass_of(options).queries[layer] = q


def blended_queries(options: dict, layer: LayerKey, q: Tensor) -> Tensor:
    """The queries a sharing layer should use: blended on blending steps, unchanged otherwise."""
    blend_pass = query_blend_pass_of(options)
    if blend_pass is None or blend_pass.recording or layer not in blend_pass.queries:
        return q
    return blend_queries(blend_pass.queries[layer], q, blend_pass.weight)


def install_query_blending(model_patcher, window: SigmaWindow, weights: tuple[float, float]) -> None:
    """Register the two-forward wrapper on a clone (weights: s on the first and on the last blending step)."""

    def blend_early_steps(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        call = call_of(transformer_options)
        weight = None
        if call is not None and call.run is not None and window.contains(call.sigma):
            weight = query_blend_weight(call.step, call.run.step_count, *weights)
        if weight is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        plain = QueryBlendPass(recording=True, weight=weight)
        # The plain forward's output is discarded: only the queries it records are used.
        executor(x, timesteps, context, y, fresh_control(control),
                 with_entry(transformer_options, QUERY_BLEND_KEY, plain), **kwargs)
        blend = QueryBlendPass(recording=False, weight=weight, queries=plain.queries)
        return executor(x, timesteps, context, y, control, with_entry(transformer_options, QUERY_BLEND_KEY, blend),
                        **kwargs)

    PackPatcher(model_patcher).install_wrapper(WrappersMP.DIFFUSION_MODEL, QUERY_BLEND_WRAPPER, blend_early_steps)
