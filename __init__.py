"""Spectral Anchors: one subject kept consistent across a batch of scene prompts, training-free."""

from comfy_api.latest import ComfyExtension, io

from .nodes import node_list

WEB_DIRECTORY = "./web"


class SpectralAnchorsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> SpectralAnchorsExtension:
    return SpectralAnchorsExtension()
