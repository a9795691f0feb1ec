"""Thin V3 nodes and the ComfyUI glue that attaches the method in attention/ to a MODEL clone."""

from comfy_api.latest import io

from .anchor_attention_node import SpectralAnchorAttention
from .consistency_score_node import SpectralConsistencyScore
from .feature_injection_node import SpectralFeatureInjection
from .preset_node import SpectralConsistencyPreset
from .reference_anchors_node import SpectralReferenceAnchors
from .sheet_node import SpectralSheet
from .spectrum_node import SpectralReweight, SpectralTruncate
from .spectrum_plot_node import SpectralSpectrumPlot
from .story_node import SpectralStoryPrompts


def node_list() -> list[type[io.ComfyNode]]:
    return [SpectralAnchorAttention, SpectralTruncate, SpectralReweight, SpectralStoryPrompts, SpectralSpectrumPlot,
            SpectralFeatureInjection, SpectralSheet, SpectralConsistencyScore, SpectralReferenceAnchors,
            SpectralConsistencyPreset]
