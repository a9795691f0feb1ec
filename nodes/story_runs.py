"""Which run of a story a sampling is: a tag in the positive conditioning, checked against the latent and noise.

A story sampled in several runs (images_per_batch > 0) gives the sampler one positive conditioning, negative and
latent per run. SpectralStoryPrompts puts a StoryRunTag (the story and the run's index) into every run's positive
conditioning, under a key ComfyUI carries through to the sampler's conds untouched. When sampling starts, an
OUTER_SAMPLE wrapper reads the tag and checks that the sampling is consistent with it:
- the latent has the run's row count (its rows are the run's rows);
- the initial noise is the run's one-batch noise (prepare_noise with the run's batch_index) and not another
  run's: a latent list paired with the conditioning list of other runs is reported instead of silently giving
  the scenes other noise. Noise from elsewhere (add_noise off, a custom noise node) is not checked;
- with a split story, the attention node's anchor count is the story's.
It then hands the patches the run's rows as a one-run story (Story.for_run) in transformer_options, so subject
masks find each row's subject tokens, for as long as the sampling lasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy.patcher_extension import WrappersMP

from .run_context import (
    STORY_RUN_KEY,
    STORY_RUN_TAG_KEY,
    STORY_RUNS_WRAPPER,
    PackPatcher,
    holding,
    sampling_options,
    story_run_of,
)
from .story import NODE_NAME as STORY_NODE
from .story import Story

ATTENTION_NODE = "Spectral Anchor Attention"


@dataclass(frozen=True)
class StoryRunTag:
    """Carried in a run's positive conditioning: this conditioning is run `run` of `story`."""

    story: Story
    run: int

    def __repr__(self) -> str:  # the story's prompts would flood any log that prints a conditioning
        return f"StoryRunTag(run {self.run + 1} of {self.story.run_count})"


@dataclass
class ActiveStoryRun:
    """The story run being sampled, in transformer_options while the sampling lasts."""

    tag: StoryRunTag
    _rows: Story | None = field(default=None, repr=False)

    @property
    def rows(self) -> Story:
        """This run's rows as a one-run story (row b of the batch is prompt b)."""
        if self._rows is None:
            self._rows = self.tag.story.for_run(self.tag.run)
        return self._rows


def tagged(conditioning: list, tag: StoryRunTag) -> list:
    """A copy of a CONDITIONING whose every entry carries `tag`."""
    return [[tensor, {**extras, STORY_RUN_TAG_KEY: tag}] for tensor, extras in conditioning]


def rows_of_story(story: Story, options: dict) -> Story:
    """The story whose prompt b is row b of the batch being sampled: the run's rows when a run is known."""
    run = story_run_of(options)
    return run.rows if run is not None and run.tag.story == story else story


def tag_in_conds(conds: dict) -> StoryRunTag | None:
    """The run tag of the conds a sampling got (None for conditioning from elsewhere); several runs are an error."""
    tags = []
    for entries in conds.values():
        for entry in entries:
            tag = entry.get(STORY_RUN_TAG_KEY)
            if tag is not None and tag not in tags:
                tags.append(tag)
    if len(tags) > 1:
        runs = ", ".join(f"run {tag.run + 1}" for tag in tags)
        raise ValueError(
            f"{ATTENTION_NODE}: the sampler's conditioning mixes several runs of a {STORY_NODE} story ({runs}). Give "
            f"each sampler run exactly one entry of that node's positive list, with the latent of the same entry.")
    return tags[0] if tags else None


def _noise_draws(like: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """Noise number 0..count-1 of `seed` for one image of `like`'s shape, as comfy.sample.prepare_noise draws them.

    A generator of our own, so the global RNG that prepare_noise seeds is left as the sampler left it.
    """
    generator = torch.Generator().manual_seed(int(seed))
    shape = [1, *like.shape[1:]]
    return torch.cat([torch.randn(shape, dtype=like.dtype, generator=generator) for _ in range(count)])


def _noise_matches(noise: torch.Tensor, draws: torch.Tensor, indices: tuple[int, ...]) -> bool:
    return all(torch.equal(noise[row], draws[index]) for row, index in enumerate(indices))


def check_run_noise(tag: StoryRunTag, noise: torch.Tensor, seed: int | None) -> None:
    """Raise when the sampler's initial noise is another run's one-batch noise (the runs were re-ordered)."""
    if seed is None or noise is None or noise.is_nested or noise.ndim < 2 or not bool(noise.any()):
        return
    layout = tag.story.layout
    own = layout.runs[tag.run]
    noise = noise.detach().cpu()
    draws = _noise_draws(noise, seed, max(own.noise_indices) + 1)
    if _noise_matches(noise, draws, own.noise_indices):
        return
    # Runs of other noise and the same size (same_noise runs all share one noise: nothing to tell apart).
    candidates = [index for index, run in enumerate(layout.runs)
                  if index != tag.run and run.row_count == own.row_count and run.noise_indices != own.noise_indices]
    if not candidates:
        return
    needed = max(max(layout.runs[index].noise_indices) for index in candidates) + 1
    if needed > draws.shape[0]:
        draws = _noise_draws(noise, seed, needed)
    for index in candidates:
        if _noise_matches(noise, draws, layout.runs[index].noise_indices):
            raise ValueError(
                f"{STORY_NODE}: the runs reached the sampler re-ordered: the positive conditioning of run "
                f"{tag.run + 1} was sampled with the latent of run {index + 1} (its batch_index gives the noise of "
                f"other scenes). Connect the positive, negative and latent lists of the same {STORY_NODE} node "
                "directly, or re-order all three lists alike.")


def check_run(tag: StoryRunTag, latent_rows: int, anchor_count: int | None, story: Story | None) -> None:
    """The checks that need no noise: the run's story, its row count and anchors."""
    if story is not None and tag.story != story:
        raise ValueError(
            f"{ATTENTION_NODE}, input 'story': the sampler's positive conditioning comes from a {STORY_NODE} node "
            "other than the one whose story is connected here. Connect the story and the sampler's positive, "
            "negative and latent to the same node.")
    run = tag.story.layout.runs[tag.run]
    if latent_rows != run.row_count:
        raise ValueError(
            f"{STORY_NODE}: run {tag.run + 1} of the story has {run.row_count} images, but the sampler's latent has "
            f"{latent_rows}. Feed each sampler the latent list of the same {STORY_NODE} node as its positive, in the "
            "same order (the latent's batch size and batch_index come from that node).")
    if anchor_count is not None and tag.story.is_split and anchor_count != tag.story.anchor_count:
        raise anchors_mismatch(anchor_count, tag.story.anchor_count)


def anchors_mismatch(attention_anchors: int, story_anchors: int) -> ValueError:
    return ValueError(
        f"{ATTENTION_NODE}, input 'anchors' is {attention_anchors}, but {STORY_NODE}, input 'anchors' is "
        f"{story_anchors}. The story replays its first {story_anchors} scenes as the anchors of every run, so the "
        "two must agree: set both to the same value.")


def _check_reference_rows(tag: StoryRunTag, model_patcher) -> None:
    """A story with reference rows needs Spectral Reference Anchors: without it they would be sampled as new images."""
    references = tag.story.reference_count
    if references and PackPatcher(model_patcher).reference_settings is None:
        raise ValueError(
            f"{STORY_NODE}, input 'reference': the story starts every run with {references} reference row(s), but "
            "the sampled model has no Spectral Reference Anchors node. Add it after the model loader (before or "
            f"after {ATTENTION_NODE}) with the same reference images, or disconnect the reference.")


def track_story_runs(model_patcher, anchor_count: int | None, story: Story | None) -> None:
    """Install the wrapper that finds, checks and hands out the story run of each sampling (idempotent)."""

    def sample_story_run(executor, *args, **kwargs):
        guider = executor.class_obj
        tag = tag_in_conds(getattr(guider, "conds", None) or {})
        if tag is None:
            return executor(*args, **kwargs)
        noise = kwargs["noise"] if "noise" in kwargs else args[0]
        latent_image = kwargs["latent_image"] if "latent_image" in kwargs else args[1]
        seed = kwargs["seed"] if "seed" in kwargs else (args[7] if len(args) > 7 else None)
        rows = latent_image.shape[0] if torch.is_tensor(latent_image) and not latent_image.is_nested else None
        if rows is not None:
            check_run(tag, rows, anchor_count, story)
            check_run_noise(tag, noise, seed)
        _check_reference_rows(tag, guider.model_patcher)
        with holding(sampling_options(guider), STORY_RUN_KEY, ActiveStoryRun(tag)):
            return executor(*args, **kwargs)

    PackPatcher(model_patcher).install_wrapper(WrappersMP.OUTER_SAMPLE, STORY_RUNS_WRAPPER, sample_story_run)
