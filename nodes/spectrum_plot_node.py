"""SpectralSpectrumPlot: draw what the spectrum filters did to the anchors' keys and values during sampling."""

from __future__ import annotations

from comfy_api.latest import io

from .search_aliases import search_aliases
from .spectrum_plot import draw_spectra
from .spectrum_plot_recording import recorder_of
from .unet_layout import layer_token_grid, unet_of

NODE_ID = "SpectralSpectrumPlot"
_MAX_HOPS = 64  # model-patching nodes between the attention node and the plot; guards against cyclic prompts


ALL_LAYERS = -1  # a plot whose layer comes from a link that is not a constant: any layer may be asked for


def plot_layers_downstream(prompt: dict | None, attention_node_id: str | None) -> set[int]:
    """Layers that SpectralSpectrumPlot nodes of this prompt want from the given attention node's MODEL.

    A plot's `model` input is followed upstream through any chain of MODEL-to-MODEL nodes (LoRA loaders,
    other patches) until it reaches the attention node. A linked `layer` is read from its source when that is a
    primitive node with a constant value; otherwise the set holds ALL_LAYERS.
    """
    if not prompt or attention_node_id is None:
        return set()
    wanted = set()
    for node in prompt.values():
        if not isinstance(node, dict) or node.get("class_type") != NODE_ID:
            continue
        inputs = node.get("inputs", {})
        if _reaches(prompt, inputs.get("model"), str(attention_node_id)):
            wanted.add(_layer_of(prompt, inputs.get("layer", 0)))
    return wanted


def arm_plots_downstream(patched, hidden) -> None:
    """Arm the recorder of a patched MODEL for the layers the plots downstream of this node ask for (every layer
    for a linked `layer`): an unfiltered K or V is decomposed for recording only there. hidden: the node's
    cls.hidden (the prompt and the node's id), None outside ComfyUI's executor."""
    recorder = recorder_of(patched)
    if recorder is None or hidden is None:
        return
    for layer in plot_layers_downstream(hidden.prompt, hidden.unique_id):
        if layer == ALL_LAYERS:
            recorder.arm_all()
        else:
            recorder.arm(layer)


def _layer_of(prompt: dict, layer) -> int:
    if isinstance(layer, list) and layer:  # a link: a primitive node's constant, or unknown until run time
        source = prompt.get(str(layer[0]), {})
        value = source.get("inputs", {}).get("value") if isinstance(source, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else ALL_LAYERS
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else 0


def _reaches(prompt: dict, link, target: str) -> bool:
    for _ in range(_MAX_HOPS):
        if not (isinstance(link, list) and link):
            return False
        source = str(link[0])
        if source == target:
            return True
        link = prompt.get(source, {}).get("inputs", {}).get("model")
    return False


class SpectralSpectrumPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="Spectral Spectrum Plot",
            category="spectral_anchors",
            **search_aliases("spectrum", "plot", "singular values"),
            description=(
                "Plots the singular values of each anchor's keys (K) and values (V) at one layer and step, before and "
                "after the spectrum filters, on a log scale. Connect the patched model and the sampler's output "
                "latent (which makes the plot run after sampling), and send the image to Preview Image. Filtered "
                "keys and values are recorded in every run, so a plot added after a run draws it at once: their "
                "filter decomposes them anyway (on layers no plot was connected to while sampling, the fast solver "
                "computes only the leading values, and the plot shows those). Unfiltered ones are decomposed only "
                "for plots that are in the prompt while sampling runs."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model coming out of Spectral Anchor Attention (LoRAs or other "
                                                "patches in between are fine)."),
                io.Latent.Input("samples", tooltip="The sampler's output. Only used to run the plot after sampling."),
                io.Int.Input("layer", default=0, min=0, max=255,
                             tooltip="Which sharing layer to plot, counted in forward order from 0 among the "
                                     "layers Spectral Anchor Attention patches (with 'decoder', 0 is the first "
                                     "decoder layer)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Sampling step to plot (0 is the first). -1 plots the last step that shared."),
            ],
            outputs=[io.Image.Output(tooltip="The figure: one panel per anchor and matrix.")],
        )

    @classmethod
    def execute(cls, model, samples, layer: int, step: int) -> io.NodeOutput:
        recorder = recorder_of(model)
        if recorder is None:
            raise ValueError("Spectral Spectrum Plot, input 'model': this model has no Spectral Anchor Attention "
                             "with sharing on. Connect the model that comes out of Spectral Anchor Attention.")
        if layer >= len(recorder.layer_keys):
            raise ValueError(f"Spectral Spectrum Plot, input 'layer': the model shares {len(recorder.layer_keys)} "
                             f"layers, so layer must be between 0 and {len(recorder.layer_keys) - 1}.")
        spectra = recorder.spectra_for(model)
        steps = spectra.records.get(layer, {}) if spectra is not None else {}
        if not steps:
            recorder.arm(layer)
            raise ValueError(f"Spectral Spectrum Plot: nothing was recorded at layer {layer} in the last sampling run "
                             "of this model. Either sharing never ran there, or neither keys nor values are filtered "
                             "and this plot was not in the prompt when Spectral Anchor Attention ran (unfiltered "
                             "matrices are decomposed only for plots that are). Recording is now on for this layer: "
                             "sample again (ComfyUI reuses a cached sampler result until one of its inputs changes).")
        chosen = max(steps) if step < 0 else step
        if chosen not in steps:
            raise ValueError(f"Spectral Spectrum Plot, input 'step': step {step} did not share. Steps with data: "
                             f"{_ranges(sorted(steps))}.")
        recorded = steps[chosen]
        kinds = [(kind, name) for kind, name in (("K", "keys"), ("V", "values")) if kind in recorded.before]
        panels = []
        anchors = recorded.before[kinds[0][0]].shape[0]
        for anchor in range(anchors):
            for kind, name in kinds:
                panels.append((f"anchor {anchor + 1} {name} ({kind}): {spectra.filters.get(kind, 'none')}",
                               recorded.before[kind][anchor].cpu(), recorded.after[kind][anchor].cpu()))
        block, block_id, index = recorder.layer_keys[layer]
        latent = samples["samples"] if isinstance(samples, dict) and "samples" in samples else None
        where = f"{block} block {block_id}, transformer {index}"
        if latent is not None and latent.ndim >= 4:
            rows, columns = layer_token_grid(unet_of(model), recorder.layer_keys[layer], *latent.shape[-2:])
            where += f"; {rows} x {columns} token grid = {rows * columns} tokens"
        title = f"layer {layer} ({where}), step {chosen}, cond chunk"
        unrecorded = [kind for kind in ("K", "V") if kind not in recorded.before]
        if unrecorded:  # unfiltered and not asked for when the run started: recorded from the next run on
            recorder.arm(layer)
            title += f"; {' and '.join(unrecorded)} unfiltered, recorded from the next run"
        return io.NodeOutput(draw_spectra(panels, title))


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{values[0]}-{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)
