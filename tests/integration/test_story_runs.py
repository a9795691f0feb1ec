"""A story split into sampler runs that replay the anchors, on the real ComfyUI: real CLIP objects (tiny random
text encoders), tiny UNets, the stock KSampler / KSamplerAdvanced / SamplerCustomAdvanced code.

The guarantee: with a deterministic sampler every image of a split story equals the one-batch story's (float
rounding only), and the replayed rows (anchors in every run, the padding targets of the last run) are identical to
their first appearance. Ancestral and SDE samplers: the anchors are identical in every run.
"""

from __future__ import annotations

import pytest
import torch
from clip_harness import tiny_clip, tiny_model_for_clip
from comfy_extras.nodes_custom_sampler import (
    BasicScheduler,
    CFGGuider,
    KSamplerSelect,
    RandomNoise,
    SamplerCustomAdvanced,
)

import nodes as comfy_nodes
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.feature_injection_node import SpectralFeatureInjection
from spectral_anchors.nodes.run_context import STORY_RUN_TAG_KEY as RUN_TAG_KEY
from spectral_anchors.nodes.spectrum_node import SpectralReweight, SpectralTruncate
from spectral_anchors.nodes.story_node import SpectralStoryPrompts

SUBJECT = "a red fox wearing a blue scarf"
STYLE = "a photo of {subject} {scene}, cinematic"
# Seven scenes, anchors 2, images_per_batch 4: runs (0 1 2 3), (0 1 4 5), (0 1 5 6): the last run replays scene 5.
SCENES = ["reading a book in a cozy library", "walking through a snowy forest", "sitting in a cafe by the window",
          "rowing a boat on a misty lake", "sketching ruins under the stars", "running along a beach at dawn",
          "sleeping by a campfire"]
SIZE = {"width": 128, "height": 96}  # a non-square 16 x 12 latent
SEED, STEPS = 11, 3
DETERMINISTIC = ("euler", "dpmpp_2m", "ddim", "uni_pc")
STOCHASTIC = ("euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde")


@pytest.fixture(scope="module")
def clip(family):
    return tiny_clip(family)


@pytest.fixture(scope="module")
def model(family):  # a UNet whose context width matches the tiny CLIP's
    return tiny_model_for_clip(family)


def story_outputs(clip, images_per_batch: int, anchors: int = 2, scenes=SCENES, **overrides):
    inputs = {"subject": SUBJECT, "subject_word": "fox", "scenes": "\n".join(scenes), "style": STYLE,
              "negative": "blurry, lowres", "same_noise": False, **SIZE, "anchors": anchors,
              "images_per_batch": images_per_batch, **overrides}
    return SpectralStoryPrompts.execute(clip=clip, **inputs).result


def spectra():
    key = SpectralTruncate.execute("quantile", 0.25, None, "exact").result[0]
    value = SpectralTruncate.execute("energy", 0.95, SpectralReweight.execute("log_squared", 1.0).result[0],
                                     "exact").result[0]
    return key, value


def attention(model, story, anchors=2, **options):
    key, value = spectra()
    options = {"start_percent": 0.01, "key_spectrum": key, "value_spectrum": value, **options}
    start = options.pop("start_percent")
    return SpectralAnchorAttention.execute(model, anchors, "decoder", start, 1.0, story=story, **options).result[0]


def ksampler(model, positive, negative, latent, sampler="euler", cfg=5.0, steps=STEPS, seed=SEED):
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative,
                                       latent)[0]["samples"]


def sample_runs(model, outputs, **settings) -> list[torch.Tensor]:
    positives, negatives, latents, _ = outputs
    return [ksampler(model, p, n, lat, **settings) for p, n, lat in zip(positives, negatives, latents, strict=True)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def assert_equals_one_batch(runs: list[torch.Tensor], one_batch: torch.Tensor, story) -> None:
    """Every row of every run (replays included) is its scene's one-batch image, within 1e-4 relative."""
    for run, samples in zip(story.layout.runs, runs, strict=True):
        assert samples.shape[0] == run.row_count
        for row in range(run.row_count):
            scene = run.scene_of(row)
            assert relative(samples[row], one_batch[scene]) <= 1e-4, (run, row, scene)


def assert_replays_identical(runs: list[torch.Tensor], story) -> None:
    """Replayed rows repeat their first appearance exactly: the anchors in every run, the last run's padding."""
    first: dict[int, torch.Tensor] = {}
    replays = 0
    for run, samples in zip(story.layout.runs, runs, strict=True):
        for row in range(run.row_count):
            scene = run.scene_of(row)
            if run.is_replayed(row):
                replays += 1
                assert torch.equal(samples[row], first[scene]), (run, row, scene)
            else:
                first.setdefault(scene, samples[row])
    assert replays == sum(run.replayed_rows for run in story.layout.runs) > 0


def test_the_layout_of_a_split_story(clip):
    positives, negatives, latents, story = story_outputs(clip, 4)
    assert story.run_count == 3 == len(positives) == len(negatives) == len(latents)
    assert [run.scenes for run in story.layout.runs] == [(0, 1, 2, 3), (0, 1, 4, 5), (0, 1, 5, 6)]
    assert [latent["batch_index"] for latent in latents] == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 5, 6]]
    assert all(latent["samples"].shape == (4, 4, 12, 16) for latent in latents)
    assert [run.replayed_rows for run in story.layout.runs] == [0, 2, 3]
    one_positive = story_outputs(clip, 0)[0][0]
    for index, (run, positive) in enumerate(zip(story.layout.runs, positives, strict=True)):
        # Each run's rows are the one-batch story's rows bit for bit, and the run carries its tag.
        assert torch.equal(positive[0][0], one_positive[0][0][list(run.scenes)])
        if "pooled_output" in one_positive[0][1]:
            assert torch.equal(positive[0][1]["pooled_output"], one_positive[0][1]["pooled_output"][list(run.scenes)])
        assert positive[0][1][RUN_TAG_KEY].run == index and positive[0][1][RUN_TAG_KEY].story == story
    for run in story.layout.runs:  # subject tokens per row, for the masks
        rows = story.for_run(story.layout.runs.index(run))
        assert rows.subject_tokens == tuple(story.subject_tokens[s] for s in run.scenes)
    _, _, same, same_story = story_outputs(clip, 4, same_noise=True)
    assert [latent["batch_index"] for latent in same] == [[0] * 4] * 3 and same_story.same_noise


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_give_every_image_its_one_batch_result(clip, model, sampler):
    one = story_outputs(clip, 0)
    split = story_outputs(clip, 4)
    one_batch = ksampler(attention(model, one[3]), one[0][0], one[1][0], one[2][0], sampler=sampler)
    runs = sample_runs(attention(model, split[3]), split, sampler=sampler)
    assert_equals_one_batch(runs, one_batch, split[3])
    assert_replays_identical(runs, split[3])
    # The comparison can fail: without sharing the targets differ beyond the tolerance (the tiny random UNet's
    # sharing effect is small, a few 1e-4), and a run with other noise far beyond it.
    plain = ksampler(model, one[0][0], one[1][0], one[2][0], sampler=sampler)
    assert relative(plain[2:], one_batch[2:]) > 3e-4
    other_noise = ksampler(attention(model, split[3]), split[0][1], split[1][1], split[2][1], sampler=sampler,
                           seed=SEED + 1)
    assert relative(other_noise[2:], one_batch[4:6]) > 1e-1


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_ancestral_and_sde_samplers_give_identical_anchors_in_every_run(clip, model, sampler):
    split = story_outputs(clip, 4)
    runs = sample_runs(attention(model, split[3]), split, sampler=sampler)
    for samples in runs[1:]:
        assert torch.equal(samples[:2], runs[0][:2])
    # The targets draw other (equally valid) per-step noise than in one batch: documented, and visible here.
    one = story_outputs(clip, 0)
    one_batch = ksampler(attention(model, one[3]), one[0][0], one[1][0], one[2][0], sampler=sampler)
    assert relative(runs[1][2:], one_batch[4:6]) > 1e-3


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_masks_query_blending_and_feature_injection_per_run(clip, model, cfg):
    steps = 10  # query blending acts on the first tenth of the steps, sharing from step 0
    options = {"start_percent": 0.0, "subject_masks": True, "mask_dropout": 0.5, "mask_seed": 3,
               "query_blending": True}

    def patched(story):
        shared = attention(model, story, **options)
        return SpectralFeatureInjection.execute(shared, 0.8, 0.1, 0.333, "finest", 2, "two-pass").result[0]

    one = story_outputs(clip, 0, scenes=SCENES[:6])
    split = story_outputs(clip, 4, scenes=SCENES[:6])
    one_batch = ksampler(patched(one[3]), one[0][0], one[1][0], one[2][0], cfg=cfg, steps=steps)
    runs = sample_runs(patched(split[3]), split, cfg=cfg, steps=steps)
    assert_equals_one_batch(runs, one_batch, split[3])
    assert_replays_identical(runs, split[3])
    # The options changed the images, so the equality above is not that of plain sharing.
    shared_only = ksampler(attention(model, one[3], start_percent=0.0), one[0][0], one[1][0], one[2][0], cfg=cfg,
                           steps=steps)
    assert relative(shared_only[2:], one_batch[2:]) > 1e-3


def test_ksampler_advanced_and_sampler_custom_advanced(clip, model):
    one = story_outputs(clip, 0)
    split = story_outputs(clip, 4)
    one_batch = ksampler(attention(model, one[3]), one[0][0], one[1][0], one[2][0])
    split_model = attention(model, split[3])

    advanced = [comfy_nodes.KSamplerAdvanced().sample(split_model, "enable", SEED, STEPS, 5.0, "euler", "normal", p,
                                                      n, lat, 0, 10000, "disable")[0]["samples"]
                for p, n, lat in zip(*split[:3], strict=True)]
    assert_equals_one_batch(advanced, one_batch, split[3])

    sampler = KSamplerSelect.execute("euler").result[0]
    sigmas = BasicScheduler.execute(split_model, "normal", STEPS, 1.0).result[0]
    noise = RandomNoise.execute(SEED).result[0]
    custom = []
    for positive, negative, latent in zip(*split[:3], strict=True):
        guider = CFGGuider.execute(split_model, positive, negative, 5.0).result[0]
        custom.append(SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result[0]["samples"])
    assert_equals_one_batch(custom, one_batch, split[3])
    assert_replays_identical(custom, split[3])


def test_a_one_run_story_samples_as_before(clip, model):
    positives, negatives, latents, story = story_outputs(clip, 0)
    assert len(positives) == 1 and "batch_index" not in latents[0] and story.run_count == 1
    # images_per_batch at least the scene count is one run too.
    assert story_outputs(clip, len(SCENES))[3].layout.runs == story.layout.runs
    out = ksampler(attention(model, story), positives[0], negatives[0], latents[0])
    assert out.shape == (len(SCENES), 4, 12, 16) and torch.isfinite(out).all()


def test_re_ordered_runs_are_an_error(clip, model):
    positives, negatives, latents, story = story_outputs(clip, 4)
    patched = attention(model, story)
    with pytest.raises(ValueError, match=r"Spectral Story Prompts: the runs reached the sampler re-ordered: the "
                                         r"positive conditioning of run 2 was sampled with the latent of run 1"):
        ksampler(patched, positives[1], negatives[1], latents[0])
    # Without a story connected to the attention node the tag in the conditioning still tells.
    with pytest.raises(ValueError, match=r"run 3 was sampled with the latent of run 2"):
        ksampler(attention(model, None), positives[2], negatives[2], latents[1])
    # A latent of the wrong size for the run.
    with pytest.raises(ValueError, match=r"run 1 of the story has 4 images, but the sampler's latent has 3"):
        ksampler(patched, positives[0], negatives[0], {"samples": latents[0]["samples"][:3]})
    # Two runs' conditionings combined into one sampling.
    mixed = comfy_nodes.ConditioningCombine().combine(positives[0], positives[1])[0]
    with pytest.raises(ValueError, match=r"mixes several runs"):
        ksampler(patched, mixed, negatives[0], latents[0])


def test_anchors_must_agree_between_story_and_attention(clip, model):
    _, _, _, story = story_outputs(clip, 4)
    with pytest.raises(ValueError, match=r"Spectral Anchor Attention, input 'anchors' is 3, but Spectral Story "
                                         r"Prompts, input 'anchors' is 2"):
        attention(model, story, anchors=3)
    positives, negatives, latents, _ = story_outputs(clip, 5, anchors=3)
    with pytest.raises(ValueError, match=r"input 'anchors' is 2, but Spectral Story Prompts, input 'anchors' is 3"):
        ksampler(attention(model, None, anchors=2), positives[0], negatives[0], latents[0])
    other = story_outputs(clip, 4, subject="a grey wolf", subject_word="wolf")
    with pytest.raises(ValueError, match=r"input 'story': the sampler's positive conditioning comes from a Spectral "
                                         r"Story Prompts node other than"):
        ksampler(attention(model, story), other[0][0], other[1][0], other[2][0])
    # A one-run story keeps old workflows working: its anchors describe the layout only.
    one = story_outputs(clip, 0)[3]
    assert attention(model, one, anchors=3) is not None


@pytest.mark.parametrize(("overrides", "input_name", "needle"), [
    ({"images_per_batch": 2}, "images_per_batch", "no room for new scenes after the 2 anchors"),
    ({"images_per_batch": 1, "anchors": 1}, "images_per_batch", "no room for new scenes after the 1 anchors"),
    ({"images_per_batch": 9, "anchors": 8}, "anchors", "8 anchors but only 7 scenes"),
])
def test_bad_run_settings_name_the_node_and_input(clip, overrides, input_name, needle):
    with pytest.raises(ValueError) as error:
        story_outputs(clip, **{"images_per_batch": 4, **overrides})
    assert str(error.value).startswith(f"Spectral Story Prompts, input '{input_name}'") and needle in str(error.value)
    assert SpectralStoryPrompts.validate_inputs(scenes="\n".join(SCENES), style=STYLE, subject=SUBJECT,
                                                subject_word="fox", **{"anchors": 2, **overrides}) == str(error.value)


def test_a_long_story_beyond_one_batch(clip):
    scenes = [f"scene number {index}" for index in range(80)]
    positives, _, latents, story = story_outputs(clip, 6, scenes=scenes)
    assert story.scene_count == 80 and story.run_count == 20 and all(lat["samples"].shape[0] == 6 for lat in latents)
    assert sorted({s for run in story.layout.runs for s in run.scenes}) == list(range(80))
