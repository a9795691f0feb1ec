"""SpectralConsistencyScore: how alike the subject looks across a sheet, with the image encoders users already own."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui
from torch import Tensor

from ..attention.consistency import Consistency, consistency, cosine_pairs
from . import io_types
from .consistency_score_alignment import AlignmentError, prompt_embeddings
from .consistency_score_chart import draw_scores
from .consistency_score_embedding import EncoderError, describe_encoder, encode_images

NODE_ID = "SpectralConsistencyScore"
NODE_NAME = "Spectral Consistency Score"
MAX_ANCHORS = 64
CLIP_T_SCALE = 2.5  # the field's CLIP-T is 2.5 x the cosine (METHOD.md section 6)
_SCENE_WIDTH = 48


def input_error(input_name: str, message: str) -> ValueError:
    return ValueError(f"{NODE_NAME}, input '{input_name}': {message}")


def story_layout(story: object, image_count: int, anchors: int) -> tuple[list, list[bool], list[str]]:
    """(what each image row shows, which rows are anchors, the label of each row) for images of this story.

    The images are either the story in scene order, one image per scene (one sampler run, or Spectral Sheet's
    images), or every row of every sampler run of a story sampled in several runs, runs in order: each run
    replays the anchors, and a replayed row is named like its first appearance so that it is counted once.
    """
    prompts = list(getattr(story, "prompts", None) or ())
    if not prompts:
        raise input_error("story", "this is not a story from Spectral Story Prompts (it has no prompts).")
    label = getattr(story, "scene_text", None)
    labels = [label(scene) if callable(label) else prompts[scene] for scene in range(len(prompts))]
    layout = getattr(story, "layout", None)
    story_anchors = getattr(layout, "anchor_count", anchors)
    if story_anchors != anchors:
        raise input_error("anchors", f"{anchors}, but this story's anchors are its first {story_anchors} scenes (set "
                                     f"in Spectral Story Prompts). Set anchors to {story_anchors}.")
    if image_count == len(prompts):
        return list(range(image_count)), [scene < anchors for scene in range(image_count)], labels
    runs = tuple(getattr(layout, "runs", None) or ())
    sampled = sum(run.row_count for run in runs)
    if runs and image_count == sampled:
        keys, flags, row_labels = [], [], []
        for run in runs:
            for row in range(run.row_count):
                scene = run.scene_of(row)
                keys.append(("reference", row) if scene is None else scene)
                flags.append(run.is_anchor(row))
                row_labels.append(f"reference image {row + 1}" if scene is None else labels[scene])
        return keys, flags, row_labels
    runs_text = f", or all {sampled} rows of its {len(runs)} sampler runs in order" if len(runs) > 1 else ""
    raise input_error("story", f"the story has {len(prompts)} scenes but images holds {image_count}. Connect this "
                               f"story's images: one per scene in scene order{runs_text}.")


def _check_batch(count: int, anchors: int, has_reference: bool) -> None:
    if anchors == 0 and not has_reference:
        raise input_error("anchors", "0 anchors and no reference: nothing to compare the images with. Set anchors to "
                                     "the number of anchor images (2 by default) or connect a reference.")
    if count < anchors + 1:
        raise input_error("images", f"{count} image(s) but anchors is {anchors}: scoring needs at least "
                                    f"{anchors + 1} (the anchors plus one image to compare). Lower anchors or give "
                                    "the whole batch.")


def _row_prompts(story: object, scenes: list) -> list[str]:
    """Each row's prompt, for prompt alignment; a reference row has none."""
    prompts = story.prompts
    missing = [row + 1 for row, scene in enumerate(scenes) if not isinstance(scene, int)]
    if missing:
        raise input_error("clip", f"images {', '.join(map(str, missing))} are reference rows, which have no prompt to "
                                  "align with. Score Spectral Sheet's images (the scenes only), or disconnect clip.")
    return [prompts[scene] for scene in scenes]


def _report(result: Consistency, encoder: str, labels: list[str] | None, reference_count: int, masked: bool,
            alignment: list[float] | None) -> str:
    counted = [row for row, flag in enumerate(result.counted) if flag]
    targets = [row for row in counted if not result.is_anchor[row]]
    lines = [NODE_NAME, f"encoder: {encoder}"]
    if result.compared_with == "reference":
        lines.append(f"compared with: the mean of the {reference_count} reference image(s)")
    else:
        anchor_count = sum(1 for row in counted if result.is_anchor[row])
        lines.append(f"compared with: the mean of the {anchor_count} anchor(s) (an anchor: with the other anchors)")
    if masked:
        lines.append("mask: subject only (background set to the encoder's mean colour)")
    lines.append(f"score: {result.score:.4f} (mean over {len(targets)} target(s))")
    lines.append(f"pairwise mean: {result.pairwise:.4f} (over {len(counted)} distinct image(s))"
                 if math.isfinite(result.pairwise) else "pairwise mean: n/a (one image)")
    if alignment is not None:
        mean = sum(alignment[row] for row in counted) / len(counted)
        lines.append(f"prompt alignment: mean cosine {mean:.4f}, CLIP-T {CLIP_T_SCALE * mean:.4f} "
                     f"(= {CLIP_T_SCALE} x cosine)")
    lines.append("image  role    similarity" + ("  prompt" if alignment is not None else "")
                 + ("  scene" if labels else ""))
    for row in counted:
        value = result.similarity[row]
        cells = [f"{row + 1:>5}", "anchor" if result.is_anchor[row] else "target",
                 f"{value:10.4f}" if math.isfinite(value) else f"{'n/a':>10}"]
        if alignment is not None:
            cells.append(f"{alignment[row]:6.4f}")
        if labels:
            scene = labels[row]
            cells.append(scene if len(scene) <= _SCENE_WIDTH else scene[:_SCENE_WIDTH - 3] + "...")
        lines.append("  ".join(cells))
    replays = [row + 1 for row, flag in enumerate(result.counted) if not flag]
    if replays:
        lines.append(f"replayed anchors counted once: images {', '.join(map(str, replays))}")
    return "\n".join(lines)


class SpectralConsistencyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=NODE_NAME,
            category="spectral_anchors",
            is_input_list=True,
            description=(
                "Scores how alike the subject looks across a batch: the mean cosine similarity of the targets' image "
                "embeddings to the anchors' mean embedding (or to the reference images' mean), with any encoder Load "
                "CLIP Vision loads (CLIP ViT-L/H/bigG, SigLIP, DINOv2). Also reports each image's similarity, the "
                "sheet's pairwise mean, and draws a bar chart. Compare settings on the same seed and prompts."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The decoded batch to score, in batch order (anchors first), e.g. "
                                                 "from VAE Decode after the sampler. A list of batches (one per "
                                                 "sampler run) is scored as one sheet, in order."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="The image encoder from Load CLIP Vision: CLIP ViT-L/H/bigG, SigLIP or "
                                            "DINOv2. Scores from different encoders are not comparable."),
                io.Int.Input("anchors", default=2, min=0, max=MAX_ANCHORS,
                             tooltip="How many of the first images are anchors (as in Spectral Anchor Attention). "
                                     "Targets are compared with the anchors' mean embedding. 0 needs a reference."),
                io.Image.Input("reference", optional=True,
                               tooltip="Optional images of the character. When connected, targets are compared with "
                                       "the mean of the reference's embeddings instead of the anchors'. Any size; "
                                       "never masked."),
                io_types.Story.Input("story", optional=True,
                                     tooltip="Optional story from Spectral Story Prompts: labels each image with its "
                                             "scene, and counts anchors replayed by a multi-run sheet once. Needed "
                                             "for prompt alignment (clip)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional subject masks, one per image (same batch length as images; resized "
                                      "to the images). Where the mask is 0 the image is set to the encoder's mean "
                                      "colour before encoding, so only the subject is scored."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: prompt alignment (CLIP-T) of each image with its story prompt. Only "
                                      "an aligned pair works: an SDXL checkpoint's CLIP (its projected CLIP-G) with "
                                      "CLIP ViT-bigG vision (clip_vision_g). Needs story."),
            ],
            outputs=[
                io.Float.Output("score", display_name="score",
                                tooltip="Mean cosine similarity of the targets to the anchors (or the reference): "
                                        "1 = identical embeddings."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-image similarities, the pairwise mean and the encoder used (also shown "
                                         "in the node)."),
                io.Image.Output("chart", display_name="chart",
                                tooltip="One bar per image; the dashed line is the score."),
            ],
        )

    @classmethod
    def execute(cls, images: Tensor | list[Tensor], clip_vision, anchors: int = 2, reference=None, story=None,
                mask=None, clip=None) -> io.NodeOutput:
        # An input list node: a sheet sampled in several runs arrives as one IMAGE batch per run, all at once.
        batches = _batches(images, "images")
        references = _batches(reference, "reference") if _single(reference) is not None else None
        clip_vision, anchors, story, clip = _single(clip_vision), _single(anchors), _single(story), _single(clip)
        count = sum(batch.shape[0] for batch in batches)
        _check_batch(count, anchors, references is not None)
        if story is not None:
            scenes, anchor_rows, labels = story_layout(story, count, anchors)
        else:
            scenes, anchor_rows, labels = list(range(count)), None, None
        masks = _masks(mask, count)
        if clip is not None and labels is None:
            raise input_error("clip", "prompt alignment compares each image with its prompt: connect the story from "
                                      "Spectral Story Prompts too, or disconnect clip.")
        try:
            starts = [sum(batch.shape[0] for batch in batches[:number]) for number in range(len(batches))]
            embeddings = torch.cat([encode_images(clip_vision, batch, None if masks is None else
                                                  masks[start:start + batch.shape[0]])
                                    for batch, start in zip(batches, starts, strict=True)])
            reference_embeddings = (torch.cat([encode_images(clip_vision, batch) for batch in references])
                                    if references is not None else None)
        except EncoderError as error:
            raise input_error("clip_vision", str(error)) from None
        try:
            alignment = None
            if clip is not None:
                text = prompt_embeddings(clip, _row_prompts(story, scenes), embeddings.shape[1])
                alignment = [float(value) for value in cosine_pairs(embeddings, text)]
        except AlignmentError as error:
            raise input_error("clip", str(error)) from None
        try:
            result = consistency(embeddings, anchors, reference_embeddings, scenes, anchor_rows)
        except ValueError as error:
            raise input_error("anchors", f"{error}. Lower anchors or give more images.") from None
        encoder = describe_encoder(clip_vision, embeddings.shape[1])
        reference_count = 0 if references is None else sum(batch.shape[0] for batch in references)
        report = _report(result, encoder, labels, reference_count, masks is not None, alignment)
        rows = [row for row, flag in enumerate(result.counted) if flag]
        compared = "the reference" if result.compared_with == "reference" else "the anchors"
        chart = draw_scores([result.similarity[row] for row in rows], [result.is_anchor[row] for row in rows],
                            [row + 1 for row in rows], f"Consistency with {compared}: {result.score:.3f}",
                            [encoder, f"pairwise mean {result.pairwise:.3f}"
                                      + ("; subject only (masked)" if masks is not None else "")], result.score)
        return io.NodeOutput(result.score, report, chart, ui=ui.PreviewText(report))


def _single(value):
    """An input that is one value: ComfyUI hands an input list node every input as a list."""
    return value[0] if isinstance(value, list) and value else (None if isinstance(value, list) else value)


def _batches(value, input_name: str) -> list[Tensor]:
    """One IMAGE batch or a list of them (one per sampler run; sizes may differ between entries)."""
    batches = value if isinstance(value, list) else [value]
    for batch in batches:
        if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[0] == 0:
            raise input_error(input_name, "expected an IMAGE batch (e.g. from VAE Decode or Load Image).")
    return batches


def _masks(value, count: int) -> list[Tensor] | None:
    """One [h, w] mask per image, from a MASK batch or a list of them, in image order."""
    if value is None or (isinstance(value, list) and not value):
        return None
    masks = []
    for batch in value if isinstance(value, list) else [value]:
        if not isinstance(batch, Tensor) or batch.ndim not in (2, 3):
            raise input_error("mask", "expected a MASK (e.g. from a segmentation node or Load Image's mask).")
        masks.extend(batch.unsqueeze(0) if batch.ndim == 2 else batch)
    if len(masks) != count:
        raise input_error("mask", f"{len(masks)} mask(s) for {count} images: give one mask per image, in the same "
                                  "order (a MASK batch of the same length), or disconnect mask.")
    return masks
