"""Reference images in a Spectral Story Prompts story: layout, conditioning, latent, runs, masks, injection, sheet.

Real comfy.sd.CLIP objects with tiny text encoders, tiny UNets sampled through comfy.sample (the stock KSampler's
path, with each run's latent batch_index as the KSampler node passes it), and ComfyUI's executor for a whole prompt.
"""

from __future__ import annotations

import comfy.sample
import pytest
import torch
from clip_harness import encode_alone, tiny_clip, tiny_model_for_clip

from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.feature_injection_node import SpectralFeatureInjection
from spectral_anchors.nodes.reference_anchors import fit_to
from spectral_anchors.nodes.reference_anchors_node import SpectralReferenceAnchors
from spectral_anchors.nodes.sheet_node import SpectralSheet
from spectral_anchors.nodes.story import default_reference_prompt, plan_runs
from spectral_anchors.nodes.story_node import SpectralStoryPrompts

SUBJECT = "a red fox wearing a blue scarf"
STYLE = "a photo of {subject} {scene}, cinematic"
SCENES = ["reading a book in a cozy library", "walking through a snowy forest", "sitting in a cafe by the window",
          "rowing a boat on a misty lake", "sketching ruins under the stars"]
WIDTH, HEIGHT = 128, 96  # a 16 x 12 latent
LATENT = (4, HEIGHT // 8, WIDTH // 8)


def references(count=2, seed=11, size=LATENT):
    return {"samples": torch.randn(count, *size, generator=torch.Generator().manual_seed(seed)) * 6.0}


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def clip(family):
    return tiny_clip(family)


@pytest.fixture(scope="module")
def model(family):
    return tiny_model_for_clip(family)


def story_prompts(clip, reference=None, scenes=SCENES, images_per_batch=0, reference_prompt="", anchors=2,
                  same_noise=False):
    return SpectralStoryPrompts.execute(clip, SUBJECT, "fox", "\n".join(scenes), STYLE, "blurry", WIDTH, HEIGHT,
                                        same_noise, anchors, images_per_batch, reference, reference_prompt).result


def patched(model, reference, story=None, anchors=2, **attention):
    shared = SpectralAnchorAttention.execute(model, anchors, "decoder", 0.01, 1.0, story=story, **attention).result[0]
    return SpectralReferenceAnchors.execute(shared, reference, 7).result[0]


def sample_runs(model, positives, negatives, latents, seed=5, steps=4, cfg=5.0, sampler="euler"):
    """Every run as the stock KSampler samples it (prepare_noise with the latent's batch_index)."""
    outputs = []
    for positive, negative, latent in zip(positives, negatives, latents, strict=True):
        noise = comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index"))
        outputs.append(comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative,
                                           latent["samples"], disable_pbar=True, seed=seed))
    return outputs


def relative_error(result, expected):
    return float((result - expected).abs().max() / expected.abs().max())


def test_reference_layout_one_run_and_split():
    one = plan_runs(5, anchor_count=2, reference_count=2)
    (run,) = one.runs
    assert run.reference_rows == 2 and run.anchor_rows == 2 and run.scenes == (0, 1, 2, 3, 4)
    assert run.noise_indices == tuple(range(7)) and run.new_rows == (2, 3, 4, 5, 6)
    assert [run.scene_of(row) for row in range(7)] == [None, None, 0, 1, 2, 3, 4]
    split = plan_runs(5, anchor_count=3, images_per_batch=4, reference_count=2)  # anchors ignored: references
    assert split.anchor_count == 2
    assert [run.scenes for run in split.runs] == [(0, 1), (2, 3), (3, 4)]  # the last run starts early
    assert [run.noise_indices for run in split.runs] == [(0, 1, 2, 3), (0, 1, 4, 5), (0, 1, 5, 6)]
    assert [run.new_rows for run in split.runs] == [(2, 3), (2, 3), (3,)]
    assert split.scene_order() == ((0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    assert plan_runs(3, reference_count=1, same_noise=True).runs[0].noise_indices == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="input 'images_per_batch'"):
        plan_runs(5, images_per_batch=2, reference_count=2)


def test_default_reference_prompt_is_the_subject_alone_in_the_style():
    assert default_reference_prompt(STYLE, SUBJECT) == "a photo of a red fox wearing a blue scarf, cinematic"
    assert default_reference_prompt("a photo of {subject}, {scene}, cinematic lighting", "an explorer") == \
        "a photo of an explorer, cinematic lighting"


def test_reference_rows_conditioning_and_latent(clip, family):
    reference = references()
    positive, negative, latent, story = story_prompts(clip, reference)
    assert story.reference_count == 2 and story.anchor_count == 2 and story.scene_count == len(SCENES)
    prompt = default_reference_prompt(STYLE, SUBJECT)
    assert story.reference_prompt == prompt and story.reference_tokens
    (positive,), (latent,) = positive, latent
    size = {"width": WIDTH, "height": HEIGHT, "crop_w": 0, "crop_h": 0, "target_width": WIDTH,
            "target_height": HEIGHT}
    alone = encode_alone(clip, prompt, **size)
    context = positive[0][0]
    assert context.shape[0] == 2 + len(SCENES)
    for row in range(2):  # each reference row is its prompt encoded alone (repeated to the batch's length)
        repeats = context.shape[1] // alone[0][0].shape[1]
        assert torch.equal(context[row], alone[0][0][0].repeat(repeats, 1))
    assert torch.equal(latent["samples"][:2], reference["samples"]) and not latent["samples"][2:].any()
    rows = story.for_run(0)
    assert rows.prompts[:2] == (prompt, prompt) and rows.subject_tokens[0] == story.reference_tokens
    custom = story_prompts(clip, reference, reference_prompt="a fox, character sheet")[3]
    assert custom.reference_prompt == "a fox, character sheet"


def test_a_reference_of_another_size_is_centre_cropped_to_width_and_height(clip):
    reference = references(1, size=(4, 20, 20))
    latent = story_prompts(clip, reference)[2][0]
    assert latent["samples"].shape == (1 + len(SCENES), *LATENT)
    assert torch.equal(latent["samples"][:1], fit_to(reference["samples"], *LATENT[1:]))


def test_story_with_references_samples_the_references_unchanged_and_split_equals_one_batch(clip, model, family):
    reference = references()
    positives, negatives, latents, story = story_prompts(clip, reference)
    (one_batch,) = sample_runs(patched(model, reference, story), positives, negatives, latents)
    assert relative_error(one_batch[:2], reference["samples"]) < 1e-5
    positives, negatives, latents, split_story = story_prompts(clip, reference, images_per_batch=4)
    runs = sample_runs(patched(model, reference, split_story), positives, negatives, latents)
    assert [run.shape[0] for run in runs] == [4, 4, 4]
    for run in runs:
        assert relative_error(run[:2], reference["samples"]) < 1e-5
    scenes = torch.cat([runs[0][2:], runs[1][2:], runs[2][3:]])
    assert relative_error(scenes, one_batch[2:]) < 1e-4  # every scene as in one batch (euler is deterministic)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_subject_masks_and_feature_injection_with_references_as_sources(clip, model, family, cfg):
    reference = references()
    positives, negatives, latents, story = story_prompts(clip, reference, scenes=SCENES[:3])
    plain = sample_runs(patched(model, reference, story), positives, negatives, latents, cfg=cfg, steps=10)[0]
    masked_model = patched(model, reference, story, subject_masks=True, mask_dropout=0.0)
    masked = sample_runs(masked_model, positives, negatives, latents, cfg=cfg, steps=10)[0]
    injected_model = SpectralFeatureInjection.execute(patched(model, reference, story), 0.8, 0.1, 0.5, "finest", 2,
                                                      "two-pass").result[0]
    injected = sample_runs(injected_model, positives, negatives, latents, cfg=cfg, steps=10)[0]
    for result in (masked, injected):
        assert relative_error(result[:2], reference["samples"]) < 1e-5
        assert torch.isfinite(result).all() and relative_error(result[2:], plain[2:]) > 1e-4


def test_masks_need_the_subject_word_in_the_reference_prompt(clip):
    story = story_prompts(clip, references(), reference_prompt="a character sheet")[3]
    with pytest.raises(ValueError, match=r"input 'reference_prompt': subject masks need the subject word 'fox'"):
        SpectralAnchorAttention.execute(tiny_model_for_clip("sdxl"), 2, "decoder", 0.01, 1.0, story=story,
                                        subject_masks=True)


def test_the_sheet_keeps_or_drops_the_reference_cells(clip):
    story = story_prompts(clip, references(), images_per_batch=4)[3]
    levels = []
    runs = []
    for run in story.layout.runs:  # references at level 0.05 and 0.1, scene s at (s + 1) / 10 + 0.2
        values = [0.05 * (row + 1) if run.scene_of(row) is None else (run.scene_of(row) + 1) / 10 + 0.2
                  for row in range(run.row_count)]
        levels.append(values)
        runs.append(torch.tensor(values)[:, None, None, None].expand(-1, 6, 8, 3).clone())
    kept, kept_sheet = SpectralSheet.execute(images=runs, story=[story], columns=[0], labels=[True], padding=[0],
                                             reference_cells=[True]).result
    dropped, _ = SpectralSheet.execute(images=runs, story=[story], columns=[0], labels=[True], padding=[0],
                                       reference_cells=[False]).result
    scenes = torch.tensor([(scene + 1) / 10 + 0.2 for scene in range(len(SCENES))])
    assert torch.allclose(dropped[:, 0, 0, 0], scenes)
    assert torch.allclose(kept[:, 0, 0, 0], torch.cat([torch.tensor([0.05, 0.1]), scenes]))
    assert kept_sheet.shape[0] == 1


def test_mismatched_references_are_clear_errors(clip, model, family):
    reference = references()
    positives, negatives, latents, story = story_prompts(clip, reference)
    shared = SpectralAnchorAttention.execute(model, 2, "decoder", 0.01, 1.0, story=story).result[0]
    with pytest.raises(ValueError, match=r"Spectral Story Prompts, input 'reference': the story starts every run "
                                         r"with 2 reference row\(s\), but the sampled model has no Spectral "
                                         r"Reference Anchors"):
        sample_runs(shared, positives, negatives, latents)
    one_reference = SpectralReferenceAnchors.execute(
        SpectralAnchorAttention.execute(model, 1, "decoder", 0.01, 1.0).result[0], references(1), 7).result[0]
    with pytest.raises(ValueError, match=r"Spectral Reference Anchors, input 'reference': 1 reference image\(s\), "
                                         r"but the Spectral Story Prompts run being sampled has 2 reference"):
        sample_runs(one_reference, positives, negatives, latents)
    plain = story_prompts(clip)
    with pytest.raises(ValueError, match=r"run being sampled has no reference"):
        sample_runs(patched(model, reference), *plain[:3])
    with pytest.raises(ValueError, match=r"Spectral Story Prompts, input 'reference': the latent has 16 channels but "
                                         r"Spectral Story Prompts makes 4-channel latents"):
        story_prompts(clip, {"samples": torch.randn(1, 16, 12, 16)})
    with pytest.raises(ValueError, match=r"Spectral Story Prompts, input 'reference': 9 images; at most 8"):
        story_prompts(clip, references(9))
    with pytest.raises(ValueError, match=r"Spectral Story Prompts, input 'images_per_batch'"):
        story_prompts(clip, references(3), images_per_batch=3)
