"""The run context (nodes/run_context.py): the pack's wrappers sit in one order whatever order the nodes ran in,
its attachments round-trip through PackPatcher, and no other module spells a key of the pack."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from comfy_harness import PACK_ROOT, tiny_model

from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.feature_injection import InjectionSettings, apply_feature_injection
from spectral_anchors.nodes.preset_same_noise import install_same_noise
from spectral_anchors.nodes.reference_anchors import ReferenceSettings, apply_reference_anchors
from spectral_anchors.nodes.run_context import WRAPPER_ORDER, PackPatcher
from spectral_anchors.nodes.spectrum_node import SpectralTruncate
from spectral_anchors.nodes.story import Story


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


def _attention(model):
    spectrum = SpectralTruncate.execute(mode="quantile", value=0.05).result[0]
    story = Story(prompts=("a", "b", "c"), subject_tokens=((1,), (1,), (1,)), subject_word="a", width=64, height=64,
                  same_noise=False)
    return SpectralAnchorAttention.execute(model, 2, "decoder", 0.0, 1.0, key_spectrum=spectrum, story=story,
                                           subject_masks=True, query_blending=True).result[0]


def _injection(model):
    return apply_feature_injection(model, InjectionSettings(anchor_count=2))


def _references(model):
    return apply_reference_anchors(model, ReferenceSettings(samples=torch.ones(2, 4, 8, 8)))


def _installed(model) -> dict[str, list[str]]:
    return {wrapper_type: [key for key in model.wrappers.get(wrapper_type, {}) if key.startswith("spectral_anchors")]
            for wrapper_type in WRAPPER_ORDER}


@pytest.mark.parametrize("order", [(_attention, _injection, _references, install_same_noise),
                                   (install_same_noise, _references, _injection, _attention),
                                   (_injection, _attention, install_same_noise, _references)])
def test_the_pack_wrappers_sit_in_one_order_whatever_order_the_nodes_ran_in(sdxl, order):
    model = sdxl.clone()
    for apply in order:
        result = apply(model)
        model = result if result is not None else model
    installed = _installed(model)
    for wrapper_type, keys in WRAPPER_ORDER.items():
        assert installed[wrapper_type] == list(keys), wrapper_type  # every feature on: every wrapper, in order


def test_another_packs_wrapper_keeps_its_place_outside_the_pack(sdxl):
    from comfy.patcher_extension import WrappersMP

    model = sdxl.clone()

    def foreign(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "another_pack", foreign)
    model = _injection(_attention(model))
    keys = list(model.wrappers[WrappersMP.OUTER_SAMPLE])
    assert keys[0] == "another_pack"
    assert model.get_wrappers(WrappersMP.OUTER_SAMPLE, "another_pack") == [foreign]


def test_attachments_round_trip_and_reach_clones(sdxl):
    model = _references(_injection(_attention(sdxl)))
    pack = PackPatcher(model.clone())
    assert pack.sharing_plan.anchor_count == 2
    assert pack.injection_settings.anchor_count == 2
    assert pack.reference_settings.count == 2
    assert pack.spectrum_recorder is not None
    assert PackPatcher(sdxl).sharing_plan is None  # the input MODEL is untouched


def test_only_the_run_context_spells_the_pack_keys():
    key = re.compile(r"[\"']spectral_anchors[._][a-z_.]*[\"']")
    spelled = {path.name: key.findall(path.read_text()) for path in sorted(Path(PACK_ROOT, "nodes").glob("*.py"))}
    assert {name: keys for name, keys in spelled.items() if keys and name != "run_context.py"} == {}
