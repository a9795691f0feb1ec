"""SpectralStoryPrompts: one subject, one scene per line -> a batch of prompts, its latent and a STORY."""

from __future__ import annotations

import numbers

import comfy.model_management
import torch
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack's own modules are imported relatively)

from . import io_types
from .story import (
    MAX_SCENES,
    Story,
    assemble_prompts,
    check_common_length,
    common_length,
    find_word_positions,
    input_error,
    resolve_subject_word,
    text_tokens,
    validation_message,
)

DEFAULT_STYLE = "a photo of {subject} {scene}, cinematic, highly detailed"
DEFAULT_NEGATIVE = "blurry, lowres, deformed, watermark, text"
# Conditioning keys that are one tensor row per prompt and are batched like the context.
_PER_ROW_KEYS = ("pooled_output",)


def _token_ids(tokens: dict) -> list[list[int | None]]:
    """The id of every position, chunk by chunk; None where an embedding vector stands (no id to match)."""
    # SDXL's CLIP-L and CLIP-G tokenizations share the vocabulary and layout; CLIP-G only pads with 0.
    key = "l" if "l" in tokens else next(iter(tokens))
    return [[int(entry[0]) if isinstance(entry[0], numbers.Integral) else None for entry in chunk]
            for chunk in tokens[key]]


class _TokenLocator:
    """Finds the subject word's tokens in tokenized prompts, using only clip.tokenize."""

    def __init__(self, clip, word: str):
        empty = _token_ids(clip.tokenize(""))[0]
        self.start_token, self.end_token = empty[0], empty[1]
        self.word_ids = [token for _, token in text_tokens(_token_ids(clip.tokenize(word)), self.start_token,
                                                           self.end_token)]
        if not self.word_ids or None in self.word_ids:
            raise input_error("subject_word", f"'{word}' does not tokenize to plain text tokens. Give a plain word.")

    def positions(self, tokens: dict) -> tuple[int, ...]:
        return find_word_positions(_token_ids(tokens), self.word_ids, self.start_token, self.end_token)


def _batch_rows(rows: list[list], input_name: str) -> list:
    """Stack single-prompt CONDITIONINGs into one whose row b is prompt b.

    Each context is repeated to the common token length, exactly as comfy/conds.py CONDCrossAttn.concat does
    when ComfyUI batches conditionings itself: attention over a repeated sequence equals attention over the
    sequence, so every row conditions its image as it would alone. Padding tokens would change that.
    """
    if len({len(entries) for entries in rows}) != 1:
        raise input_error("clip", "the text encoder returned a different number of conditioning entries per prompt.")
    batched = []
    for entries in zip(*rows, strict=True):
        contexts = [entry[0] for entry in entries]
        length = common_length([context.shape[1] for context in contexts])
        context = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in contexts])
        extras = {}
        for key in dict.fromkeys(k for entry in entries for k in entry[1]):
            values = [entry[1].get(key) for entry in entries]
            if key in _PER_ROW_KEYS and all(torch.is_tensor(v) and v.shape[0] == 1 for v in values):
                extras[key] = torch.cat(values)
            elif any(torch.is_tensor(v) for v in values) or any(v is not values[0] and v != values[0] for v in values):
                raise input_error(input_name, f"this text encoder adds a per-prompt '{key}' that cannot be batched; "
                                              "use an SD1.x, SD2.x or SDXL CLIP.")
            else:
                extras[key] = values[0]
        batched.append([context, extras])
    return batched


class SpectralStoryPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralStoryPrompts",
            display_name="Spectral Story Prompts",
            category="spectral_anchors",
            description=(
                "Turns one subject and a list of scenes into one batch: image b gets the style template filled with "
                "the subject and scene b. Outputs the batched positive conditioning (one row per scene), the "
                "negative, an empty latent with one image per scene, and a STORY that tells the other Spectral "
                "nodes where the subject word sits in every prompt. Works with SDXL (both text encoders, pooled "
                "output and size conditioning) and SD1.x / SD2.x CLIPs."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder from the checkpoint loader (SDXL or SD1.x / SD2.x)."),
                io.String.Input("subject", default="a red fox wearing a blue scarf", dynamic_prompts=False,
                                tooltip="The character or object to keep consistent, described once. It replaces "
                                        "{subject} in the style template for every scene."),
                io.String.Input("subject_word", default="", dynamic_prompts=False,
                                tooltip="The word of the subject that names it, used to find the subject's tokens "
                                        "(for subject masks). Empty uses the subject's last word, so set it when "
                                        "that is not the noun: 'fox' in 'a red fox wearing a blue scarf'."),
                io.String.Input("scenes", multiline=True, dynamic_prompts=False,
                                default="reading a book in a cozy library\nwalking through a snowy forest\n"
                                        "sitting in a cafe by the window",
                                tooltip=f"One scene per line; each line becomes one image of the batch, in order. "
                                        f"Blank lines are ignored. At most {MAX_SCENES} scenes. The first lines are "
                                        "the anchors of Spectral Anchor Attention."),
                io.String.Input("style", default=DEFAULT_STYLE, multiline=True, dynamic_prompts=False,
                                tooltip="The prompt template of every image: {subject} and {scene} are replaced by "
                                        "the subject and the scene line. Both placeholders are required."),
                io.String.Input("negative", default=DEFAULT_NEGATIVE, multiline=True, dynamic_prompts=False,
                                tooltip="The negative prompt, shared by every image."),
                io.Int.Input("width", default=1024, min=64, max=comfy_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Image width in pixels: the latent's width (/8) and SDXL's size conditioning."),
                io.Int.Input("height", default=1024, min=64, max=comfy_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Image height in pixels: the latent's height (/8) and SDXL's size conditioning."),
                io.Boolean.Input("same_noise", default=False,
                                 tooltip="Start every image from the same initial noise (with the stock KSampler "
                                         "and any sampler that honours the latent's batch_index): more identity, "
                                         "less variety of pose and layout."),
            ],
            outputs=[
                io.Conditioning.Output("positive_conditioning", display_name="positive",
                                       tooltip="One row per scene, in order: row b conditions image b."),
                io.Conditioning.Output("negative_conditioning", display_name="negative",
                                       tooltip="The negative prompt, shared by every image."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="An empty latent with one image per scene (and, with same_noise, one "
                                         "shared noise index)."),
                io_types.Story.Output("story", display_name="story",
                                      tooltip="The prompts and where the subject word sits in each, for the other "
                                              "Spectral Anchors nodes."),
            ],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None, subject_word: str | None = None, scenes: str | None = None,
                        style: str | None = None) -> bool | str:
        # Runs when the prompt is queued, before any model loads; inputs fed by links arrive as None.
        message = validation_message(subject, subject_word, scenes, style)
        return True if message is None else message

    @classmethod
    def execute(cls, clip, subject: str, subject_word: str, scenes: str, style: str, negative: str, width: int,
                height: int, same_noise: bool) -> io.NodeOutput:
        if clip is None:
            raise input_error("clip", "no text encoder. Connect the CLIP output of a checkpoint loader.")
        prompts = assemble_prompts(subject, scenes, style)
        word = resolve_subject_word(subject, subject_word)
        locator = _TokenLocator(clip, word)
        if not locator.positions(clip.tokenize(subject)):
            raise input_error("subject_word", f"'{word}' is not among the subject's tokens. Give a word of it.")

        tokenized = [clip.tokenize(prompt) for prompt in prompts]
        lengths = [sum(len(chunk) for chunk in _token_ids(tokens)) for tokens in tokenized]
        check_common_length([len(_token_ids(tokens)) for tokens in tokenized])

        # SDXL's size conditioning, as CLIPTextEncodeSDXL adds it (uncropped, target = image size); other
        # models ignore these keys.
        size = {"width": width, "height": height, "crop_w": 0, "crop_h": 0,
                "target_width": width, "target_height": height}
        # Each prompt is encoded alone, through the path CLIPTextEncode takes, so row b is bit for bit what
        # CLIPTextEncode gives for prompt b.
        rows = [clip.encode_from_tokens_scheduled(tokens, add_dict=size) for tokens in tokenized]
        for row, length in zip(rows, lengths, strict=True):
            if row[0][0].shape[1] != length:
                raise input_error("clip", "this text encoder's output does not follow its tokens one to one; use an "
                                          "SD1.x, SD2.x or SDXL CLIP.")
        positive = _batch_rows(rows, "clip")
        negative_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(negative), add_dict=size)

        samples = torch.zeros([len(prompts), 4, height // 8, width // 8],
                              device=comfy.model_management.intermediate_device())
        latent = {"samples": samples}
        if same_noise:
            # The stock KSampler draws image b's noise as noise number batch_index[b] of the seed.
            latent["batch_index"] = [0] * len(prompts)

        story = Story(prompts=tuple(prompts), subject_tokens=tuple(locator.positions(t) for t in tokenized),
                      subject_word=word, width=width, height=height, same_noise=same_noise,
                      sequence_lengths=tuple(lengths))
        return io.NodeOutput(positive, negative_conditioning, latent, story)
