"""SpectralSheet, and whole prompts with story lists run by ComfyUI's own executor (execution.PromptExecutor).

The executor tests queue API-format prompts the way the server does: the stock KSampler runs once per entry of
the story's lists and SpectralSheet receives every run at once. Two test-only nodes stand in for what a tiny model
cannot have: a loader that hands out the tiny MODEL and CLIP, and a decoder that turns latents into images
(no tiny VAE exists); a third records what reaches it.
"""

from __future__ import annotations

import pytest
import torch
from clip_harness import tiny_clip, tiny_model_for_clip
from comfy_harness import RecordNode, run_prompt

import nodes as comfy_nodes
from spectral_anchors.nodes import node_list
from spectral_anchors.nodes.sheet import auto_columns
from spectral_anchors.nodes.sheet_node import SpectralSheet
from spectral_anchors.nodes.story_node import SpectralStoryPrompts

SUBJECT = "a red fox wearing a blue scarf"
STYLE = "a photo of {subject} {scene}, cinematic"
SCENES = ["reading a book in a cozy library", "walking through a snowy forest", "sitting in a cafe by the window",
          "rowing a boat on a misty lake", "sketching ruins under the stars", "running along a beach at dawn",
          "sleeping by a campfire"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip("sdxl")


def make_story(clip, images_per_batch=4, scenes=SCENES, anchors=2):
    return SpectralStoryPrompts.execute(clip, SUBJECT, "fox", "\n".join(scenes), STYLE, "blurry", 128, 96, False,
                                        anchors, images_per_batch).result


def scene_coloured_runs(story, height=12, width=16):
    """One IMAGE per run whose rows are a flat grey level unique to their scene (replays repeat it)."""
    runs = []
    for run in story.layout.runs:
        levels = torch.tensor([(scene + 1) / (story.scene_count + 1) for scene in run.scenes])
        runs.append(levels[:, None, None, None].expand(-1, height, width, 3).clone())
    return runs


def sheet(images, story, columns=0, labels=True, padding=8):
    """Called as ComfyUI calls a list-input node: every input a list."""
    return SpectralSheet.execute(images=images, story=[story], columns=[columns], labels=[labels],
                                 padding=[padding]).result


def test_scene_order_each_anchor_once_and_the_grid(clip):
    story = make_story(clip)[3]
    runs = scene_coloured_runs(story)
    ordered, grid = sheet(runs, story, labels=False, padding=4)
    assert ordered.shape == (7, 12, 16, 3)
    expected = torch.tensor([(scene + 1) / 8 for scene in range(7)])
    assert torch.equal(ordered[:, 0, 0, 0], expected)
    columns = auto_columns(7, 12, 16)
    assert columns == 3
    assert grid.shape == (1, 3 * 12 + 4 * 4, 3 * 16 + 4 * 4, 3)
    for scene in range(7):  # each cell holds its scene at its own size (uint8 rounding)
        top, left = 4 + (scene // 3) * 16, 4 + (scene % 3) * 20
        cell = grid[0, top:top + 12, left:left + 16]
        assert (cell - expected[scene]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(grid[0, :4], torch.ones_like(grid[0, :4]))  # the padding is white
    # The same with a list of single images (Rebatch Images) and with a fixed column count.
    singles = [image[None] for batch in runs for image in batch]
    assert torch.equal(sheet(singles, story, labels=False)[0], ordered)
    assert sheet(runs, story, columns=7, labels=False, padding=0)[1].shape == (1, 12, 7 * 16, 3)


def test_labels_write_each_scene_under_its_cell(clip):
    story = make_story(clip)[3]
    runs = scene_coloured_runs(story, 96, 128)
    plain = sheet(runs, story, labels=False)[1]
    labelled = sheet(runs, story, labels=True)[1]
    assert labelled.shape[2] == plain.shape[2] and labelled.shape[1] > plain.shape[1]
    # Dark text pixels lie under the first cell, in the label band, and nowhere in the unlabelled sheet's padding.
    band = labelled[0, 8 + 96:8 + 96 + (labelled.shape[1] - plain.shape[1]) // 3, 8:8 + 128]
    assert (band < 0.3).any()
    assert not (plain[0, 8 + 96:16 + 96] < 0.9).any()
    assert story.scene_text(0) == SCENES[0]


def test_a_one_run_story(clip):
    story = make_story(clip, images_per_batch=0, scenes=SCENES[:3])[3]
    images = torch.rand(3, 20, 24, 3)
    ordered, grid = sheet([images], story, labels=True)
    assert torch.equal(ordered, images) and grid.shape[0] == 1 and grid.shape[-1] == 3
    # Called with plain values, not lists, it works as well.
    assert torch.equal(SpectralSheet.execute(images=images, story=story, columns=0, labels=False).result[0], images)


@pytest.mark.parametrize(("case", "needle"), [
    ("fewer_runs", r"input 'images': 2 image batches \(4 \+ 4 images\), but the story has 3 runs of 4 \+ 4 \+ 4"),
    ("wrong_rows", r"input 'images': entry 2 has 3 images, but run 2 of the story has 4"),
    ("sizes", r"input 'images': the runs' images differ in size"),
    ("no_story", r"input 'story': no story"),
    ("two_stories", r"input 'story': 2 different values"),
    ("empty", r"input 'images': no images"),
])
def test_bad_input_names_the_node_and_input(clip, case, needle):
    story = make_story(clip)[3]
    runs = scene_coloured_runs(story)
    other = make_story(clip, scenes=SCENES[:6])[3]
    call = {
        "fewer_runs": lambda: sheet(runs[:2], story),
        "wrong_rows": lambda: sheet([runs[0], runs[1][:3], runs[2]], story),
        "sizes": lambda: sheet([runs[0], runs[1][:, :8], runs[2]], story),
        "no_story": lambda: SpectralSheet.execute(images=runs, story=[None], columns=[0], labels=[True]),
        "two_stories": lambda: SpectralSheet.execute(images=runs, story=[story, other], columns=[0], labels=[True]),
        "empty": lambda: sheet([], story),
    }[case]
    with pytest.raises(ValueError, match=rf"^Spectral Sheet, {needle}"):
        call()


def test_registered_with_list_input_and_tooltips():
    assert SpectralSheet in node_list()
    schema = SpectralSheet.GET_SCHEMA()
    assert schema.is_input_list
    assert [i.id for i in schema.inputs] == ["images", "story", "columns", "labels", "padding", "reference_cells"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [o.io_type for o in schema.outputs] == ["IMAGE", "IMAGE"]


# ---------------------------------------------------------------- whole prompts through ComfyUI's executor

class _TinyLoader:
    """Test stand-in for a checkpoint loader: the tiny MODEL and CLIP of this module."""

    models: dict = {}
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return self.models["model"], self.models["clip"]


class _LatentToImage:
    """Test stand-in for VAE Decode: the latent's first three channels, squashed into 0..1, upsampled 2x."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        image = torch.sigmoid(samples["samples"][:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2)
        return (image.movedim(1, -1).contiguous(),)


@pytest.fixture
def registered(monkeypatch, clip):
    _TinyLoader.models = {"model": tiny_model_for_clip("sdxl"), "clip": clip}
    RecordNode.seen = {}
    for name, node in {"TinyLoader": _TinyLoader, "LatentToImage": _LatentToImage, "Record": RecordNode,
                       **{cls.GET_SCHEMA().node_id: cls for cls in node_list()}}.items():
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, node)
    return RecordNode.seen


def _story_prompt(story_inputs: dict, sheet_node: bool = True) -> dict:
    prompt = {
        "loader": {"class_type": "TinyLoader", "inputs": {}},
        "story": {"class_type": "SpectralStoryPrompts",
                  "inputs": {"clip": ["loader", 1], "subject": SUBJECT, "subject_word": "fox",
                             "scenes": "\n".join(SCENES[:6]), "style": STYLE, "negative": "blurry", "width": 128,
                             "height": 96, "same_noise": False, **story_inputs}},
        "attention": {"class_type": "SpectralAnchorAttention",
                      "inputs": {"model": ["loader", 0], "anchors": 2, "layers": "decoder", "start_percent": 0.01,
                                 "end_percent": 1.0, "story": ["story", 3]}},
        "sampler": {"class_type": "KSampler",
                    "inputs": {"model": ["attention", 0], "seed": 5, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
                               "scheduler": "normal", "positive": ["story", 0], "negative": ["story", 1],
                               "latent_image": ["story", 2], "denoise": 1.0}},
        "decode": {"class_type": "LatentToImage", "inputs": {"samples": ["sampler", 0]}},
        "record_latents": {"class_type": "Record", "inputs": {"value": ["sampler", 0], "key": "latents"}},
    }
    if sheet_node:
        prompt["sheet"] = {"class_type": "SpectralSheet",
                           "inputs": {"images": ["decode", 0], "story": ["story", 3], "columns": 0, "labels": True}}
        prompt["record_images"] = {"class_type": "Record", "inputs": {"value": ["sheet", 0], "key": "images"}}
        prompt["record_sheet"] = {"class_type": "Record", "inputs": {"value": ["sheet", 1], "key": "sheet"}}
    return prompt


def test_a_split_story_through_the_executor_equals_the_one_batch_prompt(registered):
    executor = run_prompt(_story_prompt({"anchors": 2, "images_per_batch": 4}))
    assert executor.success, executor.status_messages[-1]
    split = dict(registered)
    assert [latent["samples"].shape[0] for latent in split["latents"]] == [4, 4]  # the sampler ran once per run

    # A workflow saved before the story had anchors / images_per_batch: one run, as before.
    registered.clear()
    executor = run_prompt(_story_prompt({}))
    assert executor.success, executor.status_messages[-1]
    (one_batch,) = registered["latents"]
    assert one_batch["samples"].shape[0] == 6

    rows = torch.cat([split["latents"][0]["samples"], split["latents"][1]["samples"][2:]])
    assert float((rows - one_batch["samples"]).abs().max() / one_batch["samples"].abs().max()) <= 1e-4
    (ordered,) = split["images"]
    assert ordered.shape == (6, 24, 32, 3)
    assert torch.allclose(ordered, registered["images"][0], atol=1e-4)
    assert split["sheet"][0].shape[0] == 1


def test_an_old_workflow_without_the_sheet_runs_unchanged(registered):
    executor = run_prompt(_story_prompt({}, sheet_node=False))
    assert executor.success, executor.status_messages[-1]
    (latent,) = registered["latents"]
    assert latent["samples"].shape == (6, 4, 12, 16) and "batch_index" not in latent
