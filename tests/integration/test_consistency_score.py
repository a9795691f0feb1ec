"""SpectralConsistencyScore on the real ComfyUI: a tiny comfy.clip_vision.ClipVisionModel (ComfyUI's own class, a
config in ComfyUI's format with small sizes, seeded random weights) and real tiny comfy.sd.CLIP text encoders."""

from __future__ import annotations

import math

import pytest
import torch
from clip_harness import tiny_clip
from clip_vision_harness import tiny_clip_vision

from spectral_anchors.nodes.consistency_score_node import SpectralConsistencyScore
from spectral_anchors.nodes.story import Story

# Random-weight encoders map every pair of images to fairly similar embeddings; 1e-5 of a cosine is float32
# rounding, while the different images below sit at least 0.02 lower.
SAME = 1e-5


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    return tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))


def pictures(count: int, height: int = 48, width: int = 40, seed: int = 0) -> list[torch.Tensor]:
    """Distinct structured images [1, H, W, 3]: smooth colour fields with a bright block at a random place."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        image = torch.rand(1, 1, 1, 3, generator=generator).expand(1, height, width, 3).clone()
        top, left = (int(v) for v in torch.randint(0, min(height, width) // 2, (2,), generator=generator))
        image[:, top:top + height // 3, left:left + width // 3] = torch.rand(3, generator=generator)
        made.append(image)
    return made


def embed(clip_vision, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return clip_vision.encode_image(image, crop=True)["image_embeds"].double().flatten()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def score(clip_vision, images, **inputs):
    output = SpectralConsistencyScore.execute(images=images, clip_vision=clip_vision, **inputs)
    value, report, chart = output.result
    return value, report, chart, output.ui.as_dict()


def test_identical_images_score_one(clip_vision) -> None:
    image = pictures(1)[0]
    value, report, chart, ui = score(clip_vision, image.repeat(5, 1, 1, 1), anchors=2)
    assert value == pytest.approx(1.0, abs=SAME)
    assert "pairwise mean: 1.0000" in report and "score: 1.0000 (mean over 3 target(s))" in report
    assert "clip_vision_model, 2 layers, width 64, 64 px input), 32-d embeddings" in report
    assert ui == {"text": (report,)}  # the report the frontend shows on the node
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.std() > 0.05


def test_a_different_image_scores_lower(clip_vision) -> None:
    same, other = pictures(2, seed=1)
    value, report, *_ = score(clip_vision, torch.cat([same, same, same, other]), anchors=2)
    expected = cosine(embed(clip_vision, other), embed(clip_vision, same))
    assert expected < 1 - 0.02, "the test images must be told apart by the tiny encoder"
    assert value == pytest.approx((1.0 + expected) / 2, abs=SAME)
    lines = {line.split()[0]: line for line in report.splitlines() if line.strip()[:1].isdigit()}
    assert float(lines["3"].split()[2]) == pytest.approx(1.0, abs=1e-4)
    assert float(lines["4"].split()[2]) == pytest.approx(expected, abs=1e-4)


def test_a_reference_replaces_the_anchors(clip_vision) -> None:
    anchor, target, reference = pictures(3, seed=2)
    batch = torch.cat([anchor, anchor, target])
    alone, *_ = score(clip_vision, batch, anchors=2)
    # A reference of another size (and a batch of two identical views) is fine: it is encoded on its own.
    big_reference = torch.nn.functional.interpolate(reference.movedim(-1, 1), size=(70, 90)).movedim(1, -1)
    value, report, *_ = score(clip_vision, batch, anchors=2, reference=big_reference.repeat(2, 1, 1, 1))
    expected = cosine(embed(clip_vision, target), embed(clip_vision, big_reference))
    assert value == pytest.approx(expected, abs=SAME)
    assert alone == pytest.approx(cosine(embed(clip_vision, target), embed(clip_vision, anchor)), abs=SAME)
    assert abs(value - alone) > 0.02
    assert "compared with: the mean of the 2 reference image(s)" in report
    # The reference identical to the target gives 1 whatever the anchors are; zero anchors are allowed with it.
    assert score(clip_vision, batch, anchors=2, reference=target)[0] == pytest.approx(1.0, abs=SAME)
    assert score(clip_vision, target.repeat(2, 1, 1, 1), anchors=0, reference=target)[0] == pytest.approx(1.0,
                                                                                                          abs=SAME)


def test_masks_remove_the_background(clip_vision) -> None:
    subject, background_a, background_b = pictures(3, height=64, width=64, seed=4)
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 20:44] = 1.0
    images = []
    for background in (background_a, background_a, background_b):
        image = background.clone()
        image[:, 16:48, 20:44] = subject[:, 16:48, 20:44]
        images.append(image)
    batch = torch.cat(images)
    unmasked, *_ = score(clip_vision, batch, anchors=2)
    masked, report, *_ = score(clip_vision, batch, anchors=2, mask=masks)
    assert unmasked < 1 - 0.02, "the backgrounds must move the unmasked score"
    assert masked == pytest.approx(1.0, abs=SAME)
    assert "mask: subject only" in report
    # A mask at another resolution is resized to the images: the same subject box at half size.
    half = torch.zeros(3, 32, 32)
    half[:, 8:24, 10:22] = 1.0
    assert score(clip_vision, batch, anchors=2, mask=half)[0] == pytest.approx(1.0, abs=SAME)


def test_story_labels_the_images(clip_vision) -> None:
    prompts = ("a fox reading", "a fox running", "a fox in the <b>rain</b>")
    story = Story(prompts=prompts, subject_tokens=((2,), (2,), (2,)), subject_word="fox", width=64, height=48,
                  same_noise=False)
    images = torch.cat(pictures(3, seed=5))
    value, report, *_ = score(clip_vision, images, anchors=2, story=story)
    assert value == score(clip_vision, images, anchors=2)[0]
    assert report.splitlines()[-1].endswith("a fox in the <b>rain</b>")
    with pytest.raises(ValueError, match=r"Spectral Consistency Score, input 'story': the story has 3 scenes but "
                                         r"images holds 4"):
        score(clip_vision, torch.cat(pictures(4)), anchors=2, story=story)


def test_odd_sizes_and_the_smallest_batch(clip_vision) -> None:
    images = torch.cat(pictures(2, height=37, width=91, seed=6))
    value, report, *_ = score(clip_vision, images, anchors=1)
    assert math.isfinite(value) and "n/a" in report  # the one anchor has no other anchor to be compared with


def test_bad_input_gets_clear_errors(clip_vision) -> None:
    images = torch.cat(pictures(3, seed=7))
    with pytest.raises(ValueError, match=r"input 'images': 2 image\(s\) but anchors is 2: scoring needs at least 3"):
        score(clip_vision, images[:2], anchors=2)
    with pytest.raises(ValueError, match=r"input 'anchors': 0 anchors and no reference"):
        score(clip_vision, images, anchors=0)
    with pytest.raises(ValueError, match=r"input 'mask': 2 mask\(s\) for 3 images"):
        score(clip_vision, images, anchors=2, mask=torch.ones(2, 48, 40))
    text_encoder = tiny_clip("sd15")
    with pytest.raises(ValueError, match=r"input 'clip_vision': got CLIP, which is not an image encoder"):
        score(text_encoder, images, anchors=2)
    with pytest.raises(ValueError, match=r"input 'clip': prompt alignment compares each image with its prompt"):
        score(clip_vision, images, anchors=2, clip=text_encoder)


def prompt_story(count: int) -> Story:
    prompts = tuple(f"a photo of a fox, scene {number}" for number in range(count))
    return Story(prompts=prompts, subject_tokens=((4,),) * count, subject_word="fox", width=48, height=40,
                 same_noise=False)


def test_prompt_alignment_with_an_aligned_pair(tmp_path) -> None:
    # SDXL's CLIP-G text tower is projected; the tiny one is 32 wide, so the image encoder projects to 32 too.
    clip = tiny_clip("sdxl")
    clip_vision = tiny_clip_vision(tmp_path, projection_dim=32)
    images = torch.cat(pictures(3, seed=8))
    story = prompt_story(3)
    _, report, *_ = score(clip_vision, images, anchors=2, story=story, clip=clip)
    expected = []
    for number, prompt in enumerate(story.prompts):
        _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        expected.append(cosine(embed(clip_vision, images[number:number + 1]), pooled.double().flatten()))
    rows = [line.split() for line in report.splitlines() if line.strip()[:1].isdigit()]
    assert [float(row[3]) for row in rows] == pytest.approx(expected, abs=1e-4)
    mean = sum(expected) / 3
    assert f"prompt alignment: mean cosine {mean:.4f}, CLIP-T {2.5 * mean:.4f}" in report


def test_prompt_alignment_refuses_unaligned_pairs(tmp_path) -> None:
    images = torch.cat(pictures(3, seed=9))
    story = prompt_story(3)
    aligned_width = tiny_clip_vision(tmp_path, projection_dim=32)
    with pytest.raises(ValueError, match=r"input 'clip': this CLIP \(SD1ClipModel\) has no text projection"):
        score(aligned_width, images, anchors=2, story=story, clip=tiny_clip("sd15"))
    other_width = tiny_clip_vision(tmp_path, projection_dim=16)
    with pytest.raises(ValueError, match=r"input 'clip': the CLIP's projected text embeddings are 32-d but the image "
                                         r"encoder's are 16-d"):
        score(other_width, images, anchors=2, story=story, clip=tiny_clip("sdxl"))


def run_in_comfy(**inputs):
    """The node as ComfyUI's executor runs it (execution.get_output_data): an input list node gets every input
    as a list; returns (score, report, chart, ui)."""
    import asyncio

    import execution

    data = {name: value if isinstance(value, list) else [value] for name, value in inputs.items()}
    output, ui, *_ = asyncio.run(execution.get_output_data("score-test", "1", SpectralConsistencyScore, data))
    (value,), (report,), (chart,) = output
    return value, report, chart, ui


def test_a_list_of_runs_is_scored_as_one_sheet(clip_vision) -> None:
    assert SpectralConsistencyScore.GET_SCHEMA().is_input_list
    first, second, third = pictures(3, seed=10)
    one_batch, report, *_ = run_in_comfy(images=torch.cat([first, first, second, third]), clip_vision=clip_vision,
                                         anchors=2)
    # Two entries, as a list output upstream (e.g. one VAE Decode per sampler run) hands them over; the second
    # entry at another size is encoded on its own (each image is resized to the encoder's input anyway).
    bigger = torch.nn.functional.interpolate(torch.cat([second, third]).movedim(-1, 1), size=(96, 80),
                                             mode="nearest").movedim(1, -1)
    listed, listed_report, chart, ui = run_in_comfy(images=[torch.cat([first, first]), bigger],
                                                    clip_vision=clip_vision, anchors=2)
    expected = [cosine(embed(clip_vision, image), embed(clip_vision, first)) for image in bigger.split(1)]
    assert listed == pytest.approx(sum(expected) / 2, abs=SAME)
    assert one_batch == pytest.approx(sum(cosine(embed(clip_vision, image), embed(clip_vision, first))
                                          for image in (second, third)) / 2, abs=SAME)
    assert "mean over 2 target(s)" in listed_report and "over 4 distinct image(s)" in listed_report
    assert ui["text"] == [listed_report] or ui["text"] == (listed_report,)
    # Masks come as a list too, and are matched to the images in order.
    masks = [torch.ones(2, 48, 40), torch.ones(2, 10, 10)]
    assert run_in_comfy(images=[torch.cat([first, first]), bigger], clip_vision=clip_vision, anchors=2,
                        mask=masks)[0] == pytest.approx(listed, abs=SAME)
    with pytest.raises(ValueError, match=r"input 'mask': 3 mask\(s\) for 4 images"):
        run_in_comfy(images=[torch.cat([first, first]), bigger], clip_vision=clip_vision, anchors=2,
                     mask=[torch.ones(3, 8, 8)])


def test_a_siglip_encoder_scores_its_averaged_tokens(tmp_path) -> None:
    # ComfyUI loads SigLIP without its pooling head: image_embeds are the last layer's tokens, averaged here.
    siglip = tiny_clip_vision(tmp_path, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                              hidden_size=48, intermediate_size=96, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    same, other = pictures(2, seed=11)
    value, report, *_ = score(siglip, torch.cat([same, same, same, other]), anchors=2)
    with torch.no_grad():
        tokens = siglip.encode_image(torch.cat([same, other]), crop=True)["image_embeds"]
    assert tokens.ndim == 3
    pooled = tokens.double().mean(dim=1)
    assert value == pytest.approx((1.0 + cosine(pooled[1], pooled[0])) / 2, abs=SAME)
    assert "(siglip_vision_model, 2 layers, width 48, 64 px input), 32-d embeddings" in report


def test_a_story_sampled_in_runs_counts_its_replayed_anchors_once(clip_vision) -> None:
    from spectral_anchors.nodes.sheet import scene_images
    from spectral_anchors.nodes.story import plan_runs

    # Seven scenes, two anchors, four images per run: runs [0 1 2 3], [0 1 4 5] and [0 1 5 6] (the last run starts
    # early, so it replays scene 5 too). A deterministic sampler gives every replayed row its first image.
    layout = plan_runs(7, anchor_count=2, images_per_batch=4)
    assert [run.scenes for run in layout.runs] == [(0, 1, 2, 3), (0, 1, 4, 5), (0, 1, 5, 6)]
    prompts = tuple(f"a fox, scene {number}" for number in range(7))
    story = Story(prompts=prompts, subject_tokens=((2,),) * 7, subject_word="fox", width=40, height=48,
                  same_noise=False, layout=layout, scenes=tuple(f"scene {number}" for number in range(7)))
    frames = pictures(7, seed=12)
    frames[1] = frames[0]  # two alike anchors, so that each anchor's own similarity is defined and high
    runs = [torch.cat([frames[scene] for scene in run.scenes]) for run in layout.runs]
    in_order = torch.cat(frames)

    split, report, *_ = run_in_comfy(images=runs, clip_vision=clip_vision, anchors=2, story=story)
    one_batch, one_report, *_ = run_in_comfy(images=in_order, clip_vision=clip_vision, anchors=2, story=story)
    sheet, *_ = run_in_comfy(images=scene_images(runs, layout), clip_vision=clip_vision, anchors=2, story=story)
    anchor_mean = embed(clip_vision, frames[0])
    expected = sum(cosine(embed(clip_vision, frames[scene]), anchor_mean) for scene in range(2, 7)) / 5
    assert split == pytest.approx(expected, abs=SAME)
    assert one_batch == pytest.approx(expected, abs=SAME) and sheet == pytest.approx(expected, abs=SAME)
    assert "mean over 5 target(s)" in report and "over 7 distinct image(s)" in report
    assert report.split("pairwise mean: ")[1][:6] == one_report.split("pairwise mean: ")[1][:6]
    assert "replayed anchors counted once: images 5, 6, 9, 10, 11" in report
    rows = [line for line in report.splitlines() if line.strip()[:1].isdigit()]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "7", "8", "12"]
    assert rows[-1].endswith("scene 6")  # labelled with the scene line as written
    # Counting every row instead would weigh the replays: the anchors' mean and the pairwise mean would move.
    naive, *_ = run_in_comfy(images=runs, clip_vision=clip_vision, anchors=2)
    assert abs(naive - split) > 1e-4

    with pytest.raises(ValueError, match=r"input 'story': the story has 7 scenes but images holds 8\. .*one per scene "
                                         r"in scene order, or all 12 rows of its 3 sampler runs in order"):
        run_in_comfy(images=runs[:2], clip_vision=clip_vision, anchors=2, story=story)
    with pytest.raises(ValueError, match=r"input 'anchors': 3, but this story's anchors are its first 2 scenes"):
        run_in_comfy(images=runs, clip_vision=clip_vision, anchors=3, story=story)
