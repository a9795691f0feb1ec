"""SpectralSheet: the decoded images of every run of a story -> the story in scene order, and one sheet."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from . import io_types
from .search_aliases import search_aliases
from .sheet import NODE_NAME, draw_sheet, scene_images, sheet_error
from .story import Story

MAX_COLUMNS = 64
MAX_PADDING = 256


def _one(values, input_name: str, default=None):
    """A non-list input of a list-input node: every entry the same (ComfyUI repeats a single value)."""
    if not isinstance(values, list | tuple):
        return values
    distinct = []
    for value in values:
        if all(value is not other and value != other for other in distinct):
            distinct.append(value)
    if not distinct:
        return default
    if len(distinct) > 1:
        raise sheet_error(input_name, f"{len(distinct)} different values arrived; connect a single one.")
    return distinct[0]


class SpectralSheet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralSheet",
            display_name="Spectral Sheet",
            category="spectral_anchors",
            **search_aliases("sheet", "grid", "contact sheet"),
            description=(
                "Puts a story back together after sampling: takes the decoded images of every sampler run of a "
                "Spectral Story Prompts story (one run or many) and outputs every scene once, in scene order (the "
                "anchors, which every run repeats, only once), and one sheet image: a grid of the scenes at their "
                "own size, with each scene's text under it if labels is on."
            ),
            is_input_list=True,
            inputs=[
                io.Image.Input("images",
                               tooltip="The decoded images of every run: connect VAE Decode after the sampler that "
                                       "samples the story's lists (it runs once per run; this node gets them all)."),
                io_types.Story.Input("story",
                                     tooltip="The story output of the Spectral Story Prompts node whose positive, "
                                             "negative and latent the sampler got: it says which scene each image "
                                             "is and which are repeated anchors."),
                io.Int.Input("columns", default=0, min=0, max=MAX_COLUMNS,
                             tooltip="Cells per row of the sheet; 0 = automatic (a near-square sheet, e.g. 3 x 2 "
                                     "for six square images, 4 x 3 for twelve)."),
                io.Boolean.Input("labels", default=True,
                                 tooltip="Write each scene's line under its cell (plain text, Pillow's built-in "
                                         "font; long lines are wrapped to three lines)."),
                io.Int.Input("padding", default=8, min=0, max=MAX_PADDING, optional=True,
                             tooltip="White space in pixels around and between the cells."),
                io.Boolean.Input("reference_cells", default=True, optional=True,
                                 tooltip="With a story of reference images: on = the references come first (once, "
                                         "labelled 'reference'), in both outputs; off = the scenes only."),
            ],
            outputs=[
                io.Image.Output("scene_images", display_name="images",
                                tooltip="Every scene once, in scene order: one IMAGE batch (save it with Save "
                                        "Image for one file per scene)."),
                io.Image.Output("sheet", display_name="sheet",
                                tooltip="One image: the scenes as a grid, cells of the images' own size, left to "
                                        "right, top to bottom, in scene order."),
            ],
        )

    @classmethod
    def execute(cls, images, story, columns=0, labels=True, padding=8, reference_cells=True) -> io.NodeOutput:
        batches = list(images) if isinstance(images, list | tuple) else [images]
        batches = [batch for batch in batches if batch is not None]
        story = _one(story, "story")
        if not isinstance(story, Story):
            raise sheet_error("story", "no story. Connect the story output of the Spectral Story Prompts node whose "
                                       "lists the sampler got.")
        columns = int(_one(columns, "columns", 0))
        labels = bool(_one(labels, "labels", True))
        padding = int(_one(padding, "padding", 8))
        if columns < 0:
            raise sheet_error("columns", f"{columns} is negative; 0 chooses the columns automatically.")
        if padding < 0:
            raise sheet_error("padding", f"{padding} is negative.")
        ordered = scene_images(batches, story.layout)
        texts = [story.scene_text(scene) for scene in range(story.scene_count)] if labels else None
        if texts is not None and len(texts) != ordered.shape[0]:
            raise sheet_error("story", f"the story has {len(texts)} scenes but {ordered.shape[0]} images were found.")
        references = story.reference_count if bool(_one(reference_cells, "reference_cells", True)) else 0
        if references:
            # Every run starts with the same reference rows: the first run's, once.
            ordered = torch.cat([torch.cat(batches)[:references].to(ordered), ordered])
            if texts is not None:
                texts = [f"reference {index + 1}" if references > 1 else "reference"
                         for index in range(references)] + texts
        sheet = draw_sheet(ordered, texts, columns, padding)
        return io.NodeOutput(ordered, sheet.to(ordered.device, dtype=torch.float32))


__all__ = ["NODE_NAME", "SpectralSheet"]
