"""Thin V3 nodes and the ComfyUI glue that attaches the method in attention/ to a MODEL clone."""

from comfy_api.latest import io

from .attention_node import SpectralAnchorAttention


def node_list() -> list[type[io.ComfyNode]]:
    return [SpectralAnchorAttention]
