"""The story layout (nodes/story.py): which scene each row of each sampler run shows, without a text encoder."""

from __future__ import annotations

import pytest

from spectral_anchors.nodes.story import MAX_SCENES, Story, StoryLayout, StoryRun, plan_runs


def scenes_of(layout: StoryLayout) -> list[tuple[int, ...]]:
    return [run.scenes for run in layout.runs]


@pytest.mark.parametrize(("scenes", "anchors", "per_batch"), [
    (s, a, b) for s in (1, 2, 3, 6, 7, 12, 13, 24, 64, 200) for a in (1, 2, 3) for b in (0, 4, 5, 9) if b == 0 or b > a
])
def test_every_scene_is_sampled_and_shown_once_and_every_run_starts_with_the_anchors(scenes, anchors, per_batch):
    if per_batch and anchors > scenes:
        with pytest.raises(ValueError, match="input 'anchors'"):
            plan_runs(scenes, anchors, per_batch)
        return
    layout = plan_runs(scenes, anchors, per_batch)
    shown = [layout.runs[run].scene_of(row) for run, row in layout.scene_order()]
    assert shown == list(range(scenes))
    assert sorted({s for run in layout.runs for s in run.scenes}) == list(range(scenes))
    first = layout.runs[0]
    assert first.replayed_rows == 0 and first.anchor_rows == min(anchors, scenes)
    if layout.run_count > 1:
        assert all(run.row_count == per_batch for run in layout.runs)  # equal runs: ancestral anchors agree
        for run in layout.runs:
            assert run.scenes[:anchors] == tuple(range(anchors)) and run.anchor_rows == anchors
            assert list(run.scenes[anchors:]) == sorted(run.scenes[anchors:])
            assert run.noise_indices == run.scenes  # the one-batch positions
        for earlier, run in zip(layout.runs, layout.runs[1:], strict=False):
            assert run.replayed_rows >= anchors
            # Replayed rows were produced before; new rows never were.
            seen = {s for r in layout.runs[:layout.runs.index(run)] for s in r.scenes}
            assert all(run.scene_of(row) in seen for row in range(run.replayed_rows))
            assert not any(run.scene_of(row) in seen for row in run.new_rows)
            assert earlier.scenes[-1] < run.scenes[-1]
        # Replay overhead: the anchors once per extra run, plus the last run's padding.
        assert layout.sampled_rows - scenes == sum(run.replayed_rows for run in layout.runs)
    else:
        assert first.scenes == tuple(range(scenes))
    if scenes > 1:
        assert plan_runs(scenes, min(anchors, scenes), per_batch, same_noise=True).runs[-1].noise_indices == \
            (0,) * layout.runs[-1].row_count


def test_six_scenes_two_anchors_four_per_batch():
    layout = plan_runs(6, 2, 4)
    assert scenes_of(layout) == [(0, 1, 2, 3), (0, 1, 4, 5)]
    assert [run.new_rows for run in layout.runs] == [(0, 1, 2, 3), (2, 3)]
    assert layout.runs[1].is_anchor(1) and layout.runs[1].is_replayed(1) and not layout.runs[1].is_replayed(2)
    assert plan_runs(7, 2, 4).runs[-1].scenes == (0, 1, 5, 6) and plan_runs(7, 2, 4).runs[-1].replayed_rows == 3


@pytest.mark.parametrize(("args", "input_name", "needle"), [
    ((6, 2, 2), "images_per_batch", "no room for new scenes after the 2 anchors"),
    ((6, 3, 1), "images_per_batch", "no room"),
    ((6, 0, 0), "anchors", "outside 1..64"),
    ((6, 65, 0), "anchors", "outside 1..64"),
    ((6, 2, -1), "images_per_batch", "negative"),
    ((3, 4, 5), "anchors", "4 anchors but only 3 scenes"),
])
def test_bad_settings_are_named(args, input_name, needle):
    with pytest.raises(ValueError, match=rf"^Spectral Story Prompts, input '{input_name}': .*{needle}"):
        plan_runs(*args)


def test_a_one_run_story_allows_more_anchors_than_scenes_as_before():
    layout = plan_runs(1, 2, 0)
    assert scenes_of(layout) == [(0,)] and layout.runs[0].anchor_rows == 1


def test_a_story_without_a_layout_is_one_run_and_for_run_gives_the_rows():
    story = Story(prompts=("a", "b", "c"), subject_tokens=((1,), (2,), (3,)), subject_word="x", width=64, height=64,
                  same_noise=False)
    assert story.run_count == 1 and not story.is_split and story.anchor_count == 2
    split = Story(prompts=tuple("abcdef"), subject_tokens=tuple((i,) for i in range(6)), subject_word="x", width=64,
                  height=64, same_noise=False, sequence_lengths=(77,) * 5 + (154,), layout=plan_runs(6, 2, 4),
                  scenes=tuple("ABCDEF"))
    rows = split.for_run(1)
    assert rows.prompts == ("a", "b", "e", "f") and rows.subject_tokens == ((0,), (1,), (4,), (5,))
    assert rows.sequence_lengths == (77, 77, 77, 154) and rows.scene_text(3) == "F" and rows.run_count == 1
    with pytest.raises(ValueError, match=r"scene indices \(0, 1, 2, 3\), outside the 1 scenes"):
        Story(prompts=("a",), subject_tokens=((1,),), subject_word="x", width=64, height=64, same_noise=False,
              layout=plan_runs(6, 2, 4))


def test_reference_rows_take_the_first_rows():
    # Reserved for reference anchors: rows [references][scenes]; a sheet shows scene rows only.
    run = StoryRun(scenes=(0, 1), anchor_rows=2, noise_indices=(0, 1, 2, 3), reference_rows=2)
    assert run.row_count == 4 and run.scene_of(0) is None and run.scene_of(3) == 1 and run.new_rows == (2, 3)


def test_limits():
    assert MAX_SCENES == 64
    assert plan_runs(500, 2, 12).run_count == 50
