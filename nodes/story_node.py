"""SpectralStoryPrompts: one subject, one scene per line -> a batch of prompts, its latent and a STORY."""

from __future__ import annotations

import numbers

import comfy.model_management
import torch
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack's own modules are imported relatively)

from . import io_types
from .reference_anchors import MAX_REFERENCES, fit_to, reference_samples
from .search_aliases import search_aliases
from .story import (
    DEFAULT_ANCHORS,
    MAX_ANCHORS,
    MAX_SCENES,
    MAX_STORY_SCENES,
    Story,
    assemble_prompts,
    check_common_length,
    check_run_settings,
    common_length,
    default_reference_prompt,
    find_word_positions,
    input_error,
    parse_scenes,
    plan_runs,
    resolve_subject_word,
    text_tokens,
    validation_message,
)
from .story_runs import StoryRunTag, tagged

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


def _common_lengths(rows: list[list]) -> list[int]:
    """Per conditioning entry, the token length every prompt's context is repeated to when batched."""
    if len({len(entries) for entries in rows}) != 1:
        raise input_error("clip", "the text encoder returned a different number of conditioning entries per prompt.")
    return [common_length([entry[0].shape[1] for entry in entries]) for entries in zip(*rows, strict=True)]


def _batch_rows(rows: list[list], input_name: str, lengths: list[int] | None = None) -> list:
    """Stack single-prompt CONDITIONINGs into one whose row b is prompt b.

    Each context is repeated to the common token length, exactly as comfy/conds.py CONDCrossAttn.concat does
    when ComfyUI batches conditionings itself: attention over a repeated sequence equals attention over the
    sequence, so every row conditions its image as it would alone. Padding tokens would change that.
    `lengths`: per entry, the token length to repeat to (a run of a story uses the whole story's, so its rows are
    the rows of the one-batch story bit for bit); None = the common length of these rows.
    """
    lengths = _common_lengths(rows) if lengths is None else lengths
    batched = []
    for entries, length in zip(zip(*rows, strict=True), lengths, strict=True):
        contexts = [entry[0] for entry in entries]
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
            display_name="Character Sheet Story Prompts (Spectral)",
            category="spectral_anchors",
            **search_aliases("scenes", "prompts", "batch"),
            description=(
                "Turns one subject and a list of scenes into one batch: image b gets the style template filled with "
                "the subject and scene b. Outputs the batched positive conditioning (one row per scene), the "
                "negative, an empty latent with one image per scene, and a STORY that tells the other Spectral "
                "nodes where the subject word sits in every prompt. Works with SDXL (both text encoders, pooled "
                "output and size conditioning) and SD1.x / SD2.x CLIPs. With images_per_batch, the story is split "
                "into several sampler runs that each repeat the anchors (lists: the sampler runs once per entry), "
                "for character sheets of any length in the memory of one run; Spectral Sheet puts them together."
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
                                placeholder="scenes: one per line, e.g. reading a book in a cozy library",
                                default="reading a book in a cozy library\nwalking through a snowy forest\n"
                                        "sitting in a cafe by the window",
                                tooltip=f"One scene per line; each line becomes one image of the batch, in order. "
                                        f"Blank lines are ignored. At most {MAX_SCENES} scenes in one batch (more with "
                                        "images_per_batch). The first lines (as many as anchors) are the anchors of "
                                        "Spectral Anchor Attention."),
                io.String.Input("style", default=DEFAULT_STYLE, multiline=True, dynamic_prompts=False,
                                placeholder="style: a template with {subject} and {scene}",
                                tooltip="The prompt template of every image: {subject} and {scene} are replaced by "
                                        "the subject and the scene line. Both placeholders are required."),
                io.String.Input("negative", default=DEFAULT_NEGATIVE, multiline=True, dynamic_prompts=False,
                                placeholder="negative: what no image should show",
                                tooltip="The negative prompt, shared by every image."),
                io.Int.Input("width", default=1024, min=64, max=comfy_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Image width in pixels: the latent's width (/8) and SDXL's size conditioning."),
                io.Int.Input("height", default=1024, min=64, max=comfy_nodes.MAX_RESOLUTION, step=8,
                             tooltip="Image height in pixels: the latent's height (/8) and SDXL's size conditioning."),
                io.Boolean.Input("same_noise", default=False,
                                 tooltip="Start every image from the same initial noise (with the stock KSampler "
                                         "and any sampler that honours the latent's batch_index): more identity, "
                                         "less variety of pose and layout."),
                io.Int.Input("anchors", default=DEFAULT_ANCHORS, min=1, max=MAX_ANCHORS, optional=True,
                             tooltip="How many of the first scenes are anchors. Must equal Spectral Anchor "
                                     "Attention's anchors when images_per_batch splits the story: every run "
                                     "repeats these scenes first."),
                io.Int.Input("images_per_batch", default=0, min=0, max=MAX_SCENES, optional=True,
                             tooltip="0 = the whole story in one sampler run (one batch). Otherwise the story is "
                                     "sampled in several runs of at most this many images: each run holds the "
                                     "anchors again, then the next scenes, so memory depends on this number and "
                                     "not on the story's length, and every image comes out as in one batch "
                                     f"(deterministic samplers). Must be above anchors. Up to {MAX_STORY_SCENES} "
                                     "scenes when split. Feed the decoded images of all runs to Spectral Sheet."),
                io.Latent.Input("reference", optional=True,
                                tooltip=f"Your own images of the character (1 to {MAX_REFERENCES}, from VAE Encode), "
                                        "as the anchors: every run starts with one row per reference, conditioned "
                                        "on reference_prompt and holding the reference latent (VAE Decode shows "
                                        "it), then the scenes, all of them targets; anchors is then the number of "
                                        "references. Sample with Spectral Reference Anchors given the same images. "
                                        "Another size than width x height is resized with a centre crop; scaling "
                                        "the image before VAE Encode gives better quality."),
                io.String.Input("reference_prompt", default="", optional=True, dynamic_prompts=False,
                                tooltip="With a reference: the prompt of the reference rows, describing what the "
                                        "references show. Empty = the subject alone in the style template (an "
                                        "empty scene). Must contain the subject word for subject masks."),
            ],
            outputs=[
                io.Conditioning.Output("positive_conditioning", display_name="positive", is_output_list=True,
                                       tooltip="One conditioning per sampler run (a single one without "
                                               "images_per_batch); row b conditions image b of its run."),
                io.Conditioning.Output("negative_conditioning", display_name="negative", is_output_list=True,
                                       tooltip="The negative prompt, shared by every image; one per sampler run."),
                io.Latent.Output("latent", display_name="latent", is_output_list=True,
                                 tooltip="An empty latent per sampler run, one image per row of the run; its "
                                         "batch_index gives every image its one-batch noise (with same_noise, "
                                         "one shared noise)."),
                io_types.Story.Output("story", display_name="story",
                                      tooltip="The prompts and where the subject word sits in each, for the other "
                                              "Spectral Anchors nodes."),
            ],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None, subject_word: str | None = None, scenes: str | None = None,
                        style: str | None = None, anchors: int | None = None,
                        images_per_batch: int | None = None) -> bool | str:
        # Runs when the prompt is queued, before any model loads; inputs fed by links arrive as None.
        message = validation_message(subject, subject_word, scenes, style, anchors, images_per_batch)
        return True if message is None else message

    @classmethod
    def execute(cls, clip, subject: str, subject_word: str, scenes: str, style: str, negative: str, width: int,
                height: int, same_noise: bool, anchors: int = DEFAULT_ANCHORS,
                images_per_batch: int = 0, reference=None, reference_prompt: str = "") -> io.NodeOutput:
        if clip is None:
            raise input_error("clip", "no text encoder. Connect the CLIP output of a checkpoint loader.")
        anchors, images_per_batch = int(anchors), int(images_per_batch)
        references = None
        if reference is not None:
            references = fit_to(reference_samples(reference, 4, input_error, "Spectral Story Prompts makes"),
                                height // 8, width // 8)
        reference_count = 0 if references is None else int(references.shape[0])
        check_run_settings(0, reference_count or anchors, images_per_batch)
        prompts = assemble_prompts(subject, scenes, style, split=images_per_batch > 0)
        layout = plan_runs(len(prompts), anchors, images_per_batch, bool(same_noise), reference_count)
        word = resolve_subject_word(subject, subject_word)
        locator = _TokenLocator(clip, word)
        if not locator.positions(clip.tokenize(subject)):
            raise input_error("subject_word", f"'{word}' is not among the subject's tokens. Give a word of it.")

        reference_text = ""
        if reference_count:
            reference_text = (reference_prompt or "").strip() or default_reference_prompt(style, subject)
        # The reference prompt, when there is one, is encoded last: rows[-1].
        texts = [*prompts, reference_text] if reference_count else list(prompts)
        tokenized = [clip.tokenize(prompt) for prompt in texts]
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
        negative_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(negative), add_dict=size)
        positions = [locator.positions(t) for t in tokenized]
        scene_count = len(prompts)
        story = Story(prompts=tuple(prompts), subject_tokens=tuple(positions[:scene_count]),
                      subject_word=word, width=width, height=height, same_noise=same_noise,
                      sequence_lengths=tuple(lengths[:scene_count]), layout=layout,
                      scenes=tuple(parse_scenes(scenes)), reference_prompt=reference_text,
                      reference_tokens=tuple(positions[scene_count]) if reference_count else (),
                      reference_length=lengths[scene_count] if reference_count else 0)

        # Every run's rows are repeated to the whole story's common length: the rows of the one-batch story.
        story_lengths = _common_lengths(rows)
        positives, negatives, latents = [], [], []
        for index, run in enumerate(layout.runs):
            run_rows = [rows[-1]] * run.reference_rows + [rows[scene] for scene in run.scenes]
            positive = _batch_rows(run_rows, "clip", story_lengths)
            positives.append(tagged(positive, StoryRunTag(story=story, run=index)))
            negatives.append(negative_conditioning)
            samples = torch.zeros([run.row_count, 4, height // 8, width // 8],
                                  device=comfy.model_management.intermediate_device())
            if run.reference_rows:
                # The references in their rows, so VAE Decode shows them (Spectral Reference Anchors ignores
                # what the sampler's latent holds there).
                samples[:run.reference_rows] = references.to(samples)
            latent = {"samples": samples}
            if same_noise or story.is_split:
                # The stock KSampler draws image b's noise as noise number batch_index[b] of the seed: each row
                # gets its noise of the one-batch layout (all the same with same_noise).
                latent["batch_index"] = list(run.noise_indices)
            latents.append(latent)
        return io.NodeOutput(positives, negatives, latents, story)
