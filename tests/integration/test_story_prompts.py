"""SpectralStoryPrompts on the real ComfyUI: real comfy.sd.CLIP objects (tiny random text encoders, the shipped
tokenizer), tiny UNets sampled through comfy.sample and the stock KSampler's common_ksampler."""

from __future__ import annotations

import dataclasses

import comfy.sample
import pytest
import torch
from clip_harness import encode_alone, tiny_clip, tiny_model_for_clip
from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
from comfy_harness import sample

import nodes as comfy_nodes
from spectral_anchors.nodes import node_list
from spectral_anchors.nodes.run_context import STORY_RUN_TAG_KEY as RUN_TAG_KEY
from spectral_anchors.nodes.story import MAX_SCENES, Story, build_prompt, default_subject_word, find_word_positions
from spectral_anchors.nodes.story_node import SpectralStoryPrompts
from spectral_anchors.nodes.story_runs import StoryRunTag

SUBJECT = "a red fox wearing a blue scarf"
STYLE = "a photo of {subject} {scene}, cinematic"
SCENES = ["reading a book in a cozy library", "walking through a snowy forest", "sitting in a cafe by the window"]
# 128 x 96 pixels: a non-square 16 x 12 latent that the tiny UNets halve twice.
SMALL = {"width": 128, "height": 96}
# About 80 text tokens: any prompt containing it needs a second 77-token chunk.
LONG_TAIL = "at golden hour with waves " * 16


def run(clip, **overrides):
    """The node's outputs for a one-run story: its list outputs hold one entry, unwrapped here."""
    inputs = {"subject": SUBJECT, "subject_word": "fox", "scenes": "\n".join(SCENES), "style": STYLE,
              "negative": "blurry, lowres", "same_noise": False, **SMALL, **overrides}
    positives, negatives, latents, story = SpectralStoryPrompts.execute(clip=clip, **inputs).result
    assert len(positives) == len(negatives) == len(latents) == 1 and story.run_count == 1
    return positives[0], negatives[0], latents[0], story


def size_keys(width: int, height: int) -> dict:
    return {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
            "target_height": height}


def prompt_of(scene: str, style: str = STYLE, subject: str = SUBJECT) -> str:
    return style.replace("{subject}", subject).replace("{scene}", scene)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Batched against single forwards of the same rows: float32 rounding only, far below 1e-4 of the range.
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max())


def noise_for(latent: torch.Tensor, seed: int = 3) -> torch.Tensor:
    return comfy.sample.prepare_noise(latent, seed)


def decoded(clip, prompt: str, positions) -> str:
    """The text of the tokens at `positions` of `prompt`, through the tokenizer's own vocabulary."""
    ids = [token for chunk in clip.tokenize(prompt)["l"] for token, _ in chunk]
    pieces = clip.tokenizer.untokenize([(ids[p], 1.0) for p in positions])
    return "".join(text for _, text in pieces).replace("</w>", " ").strip()


@pytest.fixture(scope="module")
def clip(family):
    return tiny_clip(family)


@pytest.fixture(scope="module")
def model(family):  # overrides the shared fixture: a UNet whose context width matches the tiny CLIP's
    return tiny_model_for_clip(family)


def test_one_row_per_scene_equal_to_encoding_each_prompt_alone(clip):
    scenes = "\n\n  " + SCENES[0] + "  \n \n" + SCENES[1] + "\r\n" + SCENES[2] + "\n\n"
    positive, negative, latent, story = run(clip, scenes=scenes)
    expected = [prompt_of(scene) for scene in SCENES]
    assert story.prompts == tuple(expected)  # blank lines ignored, lines trimmed, order kept

    context, extras = positive[0]
    assert len(positive) == 1 and context.shape[0] == 3 and extras["pooled_output"].shape[0] == 3
    for row, prompt in enumerate(expected):
        alone = encode_alone(clip, prompt, **size_keys(**SMALL))
        assert len(alone) == 1
        assert torch.equal(context[row:row + 1], alone[0][0])
        assert torch.equal(extras["pooled_output"][row:row + 1], alone[0][1]["pooled_output"])
    assert not torch.equal(context[0], context[1])
    assert {k: v for k, v in extras.items() if k not in ("pooled_output", RUN_TAG_KEY)} == size_keys(**SMALL)
    assert extras[RUN_TAG_KEY] == StoryRunTag(story=story, run=0)

    negative_alone = encode_alone(clip, "blurry, lowres", **size_keys(**SMALL))
    assert torch.equal(negative[0][0], negative_alone[0][0])
    assert torch.equal(negative[0][1]["pooled_output"], negative_alone[0][1]["pooled_output"])

    assert latent["samples"].shape == (3, 4, 12, 16) and not latent["samples"].any()
    assert "batch_index" not in latent


def test_each_image_is_sampled_with_its_own_prompt(clip, model):
    positive, negative, latent, story = run(clip)
    noise = noise_for(latent["samples"])
    batched = sample(model, positive, negative, latent["samples"], noise=noise)
    alone = []
    for row, prompt in enumerate(story.prompts):
        own = encode_alone(clip, prompt, **size_keys(**SMALL))
        alone.append(sample(model, own, negative, latent["samples"][row:row + 1], noise=noise[row:row + 1]))
    for row in range(3):
        assert close(batched[row:row + 1], alone[row])
    # Another prompt on the same noise gives a clearly different image, so the comparison above can fail.
    other = encode_alone(clip, story.prompts[1], **size_keys(**SMALL))
    wrong = sample(model, other, negative, latent["samples"][:1], noise=noise[:1])
    assert (wrong - alone[0]).abs().max() > 100 * (batched[:1] - alone[0]).abs().max()


def test_long_prompts_batch_exactly_by_repetition(clip, model):
    short, long = SCENES[0], SCENES[1] + " " + LONG_TAIL
    positive, negative, latent, story = run(clip, scenes=f"{short}\n{long}")
    assert story.sequence_lengths == (77, 154) and story.context_length == 154
    context = positive[0][0]
    assert context.shape[:2] == (2, 154)

    short_alone = encode_alone(clip, story.prompts[0], **size_keys(**SMALL))
    long_alone = encode_alone(clip, story.prompts[1], **size_keys(**SMALL))
    assert long_alone[0][0].shape[1] == 154
    assert torch.equal(context[1:2], long_alone[0][0])
    assert torch.equal(context[0:1], short_alone[0][0].repeat(1, 2, 1))  # repeated, never padded

    noise = noise_for(latent["samples"])
    batched = sample(model, positive, negative, latent["samples"], noise=noise)
    long_image = sample(model, long_alone, negative, latent["samples"][1:], noise=noise[1:])
    short_image = sample(model, short_alone, negative, latent["samples"][:1], noise=noise[:1])
    assert close(batched[1:], long_image)
    assert close(batched[:1], short_image)

    # Padding the short prompt with an encoded empty chunk instead of repeating it changes its image far beyond
    # the tolerance used above.
    empty = encode_alone(clip, "", **size_keys(**SMALL))[0][0]
    padded = [[torch.cat([short_alone[0][0], empty], dim=1), short_alone[0][1]]]
    padded_image = sample(model, padded, negative, latent["samples"][:1], noise=noise[:1])
    assert (padded_image - short_image).abs().max() > 100 * (batched[:1] - short_image).abs().max()

    # The story's repeated positions point at identical context vectors (the copies of the subject token).
    first, second = story.subject_positions_for_length(0, 154)
    assert story.subject_tokens[0] == (first,) and second == first + 77
    assert torch.equal(context[0, first], context[0, second])


def test_same_noise_gives_every_image_the_same_initial_noise_in_the_stock_ksampler(clip, model):
    for same_noise in (True, False):
        positive, negative, latent, story = run(clip, same_noise=same_noise)
        assert story.same_noise is same_noise
        noise = comfy.sample.prepare_noise(latent["samples"], 7, latent.get("batch_index"))
        rows_equal = [torch.equal(noise[0], noise[row]) for row in (1, 2)]
        assert rows_equal == [same_noise, same_noise]
        if same_noise:
            assert latent["batch_index"] == [0, 0, 0]
            # The shared noise is the one image 0 gets from this seed anyway.
            assert torch.equal(noise[:1], comfy.sample.prepare_noise(latent["samples"], 7)[:1])

        inputs = []

        def record_input(apply, args, inputs=inputs):
            inputs.append(args["input"].clone())
            return apply(args["input"], args["timestep"], **args["c"])

        spied = model.clone()
        spied.set_model_unet_function_wrapper(record_input)
        out = comfy_nodes.common_ksampler(spied, 7, 2, 1.0, "euler", "normal", positive, negative, latent)[0]
        first = inputs[0]  # cfg 1: the first model call sees exactly the cond rows, noise x sigma_max
        assert first.shape[0] == 3
        assert [torch.equal(first[0], first[row]) for row in (1, 2)] == [same_noise, same_noise]
        assert out["samples"].shape == latent["samples"].shape
        assert not torch.equal(out["samples"][0], out["samples"][1])  # same noise, different prompts


def test_subject_positions_decode_to_the_subject_word(clip):
    scenes = ["chasing another fox in the snow", SCENES[1], "in a meadow " + LONG_TAIL]
    _, _, _, story = run(clip, scenes="\n".join(scenes), style="{scene}, starring {subject}, cinematic")
    assert len(story.subject_tokens[0]) == 2  # the scene's own "fox" and the subject's
    for prompt, positions in zip(story.prompts, story.subject_tokens, strict=True):
        assert positions and all(decoded(clip, prompt, [p]) == "fox" for p in positions)
    assert min(story.subject_tokens[2]) > 77  # the subject sits in the second chunk of the long prompt
    story.require_subject_in_every_scene()


def test_multi_token_subject_word_and_default_last_word(clip):
    _, _, _, story = run(clip, subject="a fluffy snorgleblat", subject_word="")
    assert story.subject_word == "snorgleblat"
    for prompt, positions in zip(story.prompts, story.subject_tokens, strict=True):
        assert len(positions) > 1 and list(positions) == list(range(positions[0], positions[0] + len(positions)))
        assert decoded(clip, prompt, positions) == "snorgleblat"
    _, _, _, story = run(clip, subject_word="")
    assert story.subject_word == "scarf"  # the last word, unless subject_word names another
    _, _, _, story = run(clip, subject="a (red fox:1.2)", subject_word="")
    assert story.subject_word == "fox" and all(story.subject_tokens)


def test_story_value(clip):
    _, _, _, story = run(clip)
    assert isinstance(story, Story) and story.scene_count == 3
    assert (story.width, story.height, story.subject_word) == (128, 96, "fox")
    assert hash(story) == hash(run(clip)[3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        story.width = 64


def test_missing_subject_word_in_a_scene_is_named_when_masks_need_it(clip):
    # "{scene}{subject}" glues the subject to the scene's last word: "under afox" has no word "fox".
    _, _, _, story = run(clip, subject="fox", subject_word="", style="{scene}{subject}",
                         scenes="running in the snow,\nsleeping under a")
    assert story.subject_tokens[0] and story.subject_tokens[1] == ()
    with pytest.raises(ValueError, match=r"Spectral Story Prompts, input 'subject_word'.*scene 2 "
                                         r"\('sleeping under afox'\)"):
        story.require_subject_in_every_scene()


@pytest.mark.parametrize(("overrides", "input_name", "needle"), [
    ({"scenes": "\n   \n\n"}, "scenes", "no scenes"),
    ({"scenes": "\n".join(f"scene {i}" for i in range(MAX_SCENES + 1))}, "scenes", "Set images_per_batch"),
    ({"images_per_batch": 2}, "images_per_batch", "no room for new scenes after the 2 anchors"),
    ({"images_per_batch": 4, "anchors": 4}, "images_per_batch", "no room for new scenes after the 4 anchors"),
    ({"images_per_batch": 6, "anchors": 4}, "anchors", "4 anchors but only 3 scenes"),
    ({"style": "a photo of {subject}, cinematic"}, "style", "no {scene} placeholder"),
    ({"style": "a photo of {scene}"}, "style", "no {subject} placeholder"),
    ({"subject_word": "wolf"}, "subject_word", "'wolf' is not a word of the subject"),
    ({"subject_word": "fo"}, "subject_word", "'fo' is not a word of the subject"),
    ({"subject": "  "}, "subject", "empty"),
])
def test_input_errors_name_the_node_and_input_early(clip, overrides, input_name, needle):
    with pytest.raises(ValueError) as error:
        run(clip, **overrides)
    message = str(error.value)
    assert message.startswith(f"Spectral Story Prompts, input '{input_name}'") and needle in message
    # The same problem is reported when the prompt is queued, before anything runs.
    inputs = {"subject": SUBJECT, "subject_word": "fox", "scenes": "\n".join(SCENES), "style": STYLE, "anchors": 2,
              "images_per_batch": 0, **overrides}
    assert SpectralStoryPrompts.validate_inputs(**inputs) == message


def test_validation_accepts_good_and_linked_inputs():
    assert SpectralStoryPrompts.validate_inputs(subject=SUBJECT, subject_word="", scenes="a\nb", style=STYLE) is True
    assert SpectralStoryPrompts.validate_inputs(subject=None, subject_word=None, scenes=None, style=None) is True


def test_max_scenes_accepted_and_unbatchable_lengths_refused(clip):
    positive, _, latent, story = run(clip, scenes="\n".join(f"scene number {i}" for i in range(MAX_SCENES)))
    assert positive[0][0].shape[0] == latent["samples"].shape[0] == story.scene_count == MAX_SCENES
    # 1, 2, 3 and 5 chunks would need every row repeated to lcm = 30 chunks.
    scenes = ["in a library", "in a forest " + LONG_TAIL, "on a hill " + LONG_TAIL * 2, "at sea " + LONG_TAIL * 4]
    with pytest.raises(ValueError, match=r"input 'scenes'.*1, 2, 3, 5 chunks.*30 chunks"):
        run(clip, scenes="\n".join(scenes))


def test_sdxl_size_conditioning_matches_clip_text_encode_sdxl(clip, family):
    if family != "sdxl":
        pytest.skip("size conditioning is SDXL's")
    positive, negative, latent, story = run(clip, width=1024, height=576)
    assert latent["samples"].shape == (3, 4, 72, 128)
    for row, prompt in enumerate(story.prompts):
        stock = CLIPTextEncodeSDXL.execute(clip, 1024, 576, 0, 0, 1024, 576, prompt, prompt).result[0]
        assert torch.equal(positive[0][0][row:row + 1], stock[0][0])
        assert torch.equal(positive[0][1]["pooled_output"][row:row + 1], stock[0][1]["pooled_output"])
        assert {k: v for k, v in positive[0][1].items() if k not in ("pooled_output", RUN_TAG_KEY)} == \
               {k: v for k, v in stock[0][1].items() if k != "pooled_output"}
    assert {k: v for k, v in negative[0][1].items() if k != "pooled_output"} == size_keys(1024, 576)


def test_non_square_batch_samples_on_the_stock_path(clip, model):
    positive, negative, latent, _ = run(clip, width=96, height=160, same_noise=True)
    out = comfy_nodes.common_ksampler(model, 1, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
    assert out["samples"].shape == (3, 4, 20, 12) and torch.isfinite(out["samples"]).all()


def test_registered_with_a_valid_schema():
    assert SpectralStoryPrompts in node_list()
    schema = SpectralStoryPrompts.GET_SCHEMA()
    assert [i.id for i in schema.inputs] == ["clip", "subject", "subject_word", "scenes", "style", "negative",
                                             "width", "height", "same_noise", "anchors", "images_per_batch",
                                             "reference", "reference_prompt"]
    assert [o.is_output_list for o in schema.outputs] == [True, True, True, False]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs) and schema.description
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "CONDITIONING", "LATENT", "SPECTRAL_STORY"]


def test_queue_time_validation_through_comfyui(monkeypatch):
    import asyncio
    import concurrent.futures

    import execution
    from comfy_extras.nodes_primitive import StringMultiline

    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "SpectralStoryPrompts", SpectralStoryPrompts)
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "PrimitiveStringMultiline", StringMultiline)

    def errors(**inputs):
        prompt = {"1": {"class_type": "SpectralStoryPrompts",
                        "inputs": {"subject": SUBJECT, "subject_word": "fox", "scenes": "\n".join(SCENES),
                                   "style": STYLE, "negative": "", "width": 1024, "height": 1024,
                                   "same_noise": False, **inputs}},
                  "2": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a photo"}}}
        # In a worker thread: the browser tests' Playwright may leave an event loop running on this one.
        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            _, found, _ = worker.submit(asyncio.run, execution.validate_inputs("test", prompt, "1", {})).result()
        return [error for error in found if error["type"] != "required_input_missing"]  # no clip linked here

    assert errors() == []
    bad_style = errors(style="a photo of {subject}")
    # ComfyUI repeats a node's validation message once per validated input.
    assert bad_style and all(e["type"] == "custom_validation_failed" and "input 'style': the template has no "
                             "{scene} placeholder" in e["details"] for e in bad_style)
    assert errors(style=["2", 0], scenes=["2", 0]) == []  # linked: unknown until run, checked by execute
    # Only the text inputs are validated by the node, so ComfyUI's own range checks still apply.
    assert [error["type"] for error in errors(width=50)] == ["value_smaller_than_min"]


def test_prompt_assembly_rules():
    # One pass: a subject containing "{scene}" stays literal; every placeholder occurrence is filled.
    assert build_prompt("{subject} {scene}, {subject}", "a {scene} fox", "x") == "a {scene} fox x, a {scene} fox"
    assert default_subject_word("a robot named R2-D2.") == "R2-D2"
    assert default_subject_word("an old (wizard:1.3), 1990s") == "1990s"
    assert default_subject_word("(cat:0.8)") == "cat"
    # A word that ComfyUI splits over two chunks is found across the end/start/padding tokens between them.
    start, end = 49406, 49407
    chunks = [[start, 5, 7, end, end], [start, 8, end, end, end]]
    assert find_word_positions(chunks, [7, 8], start, end) == (2, 6)
    assert find_word_positions(chunks, [5], start, end) == (1,)
    assert find_word_positions(chunks, [9], start, end) == ()
