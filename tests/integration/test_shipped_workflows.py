"""The shipped workflows (tests/e2e/workflow_graphs.py builds workflows/*.json) give the same latents as recorded.

Each workflow's graph is turned into an API-format prompt and run by ComfyUI's own executor on the tiny models,
at a smaller size and fewer steps than shipped (everything else, samplers, schedulers, seeds and every pack setting,
as shipped). Test-only nodes stand in for what a tiny model cannot have: the checkpoint loader hands out the tiny
MODEL and CLIP, VAE Decode becomes a fixed latent-to-image map and VAE Encode a seeded reference latent. Every
sampler's output is reduced to a fingerprint (8x8 average-pooled latents relative to their largest magnitude,
rounded to 1e-4) and compared with tests/data/workflow_fingerprints.json within 1e-4.

The fingerprints were written from the code before a refactor of the pack's glue, so this test says that the
refactor left the images alone. Regenerate them only for an intended change of the images:
`SPECTRAL_WRITE_FINGERPRINTS=1 .venv/bin/python -m pytest tests/integration/test_shipped_workflows.py`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from clip_harness import tiny_clip, tiny_model_for_clip
from comfy_harness import RecordNode, run_prompt

import nodes as comfy_nodes
from spectral_anchors.nodes import node_list

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from workflow_graphs import SD15_CHECKPOINT, WORKFLOWS  # noqa: E402

FINGERPRINTS = Path(__file__).resolve().parents[1] / "data" / "workflow_fingerprints.json"
WRITE = os.environ.get("SPECTRAL_WRITE_FINGERPRINTS") == "1"
SIZE = 128  # pixels: a 16 x 16 latent
STEPS = 8
POOLED = 8
TOLERANCE = 1e-4
SAMPLERS = ("KSampler", "KSamplerAdvanced")
# Inputs the frontend shows as widgets but never sends to the server.
UI_ONLY_WIDGETS = {"control_after_generate"}


class _TinyCheckpoint:
    """Test stand-in for CheckpointLoaderSimple: the tiny MODEL and CLIP of the checkpoint's family (no VAE)."""

    models: dict = {}
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"family": ("STRING", {"default": "sdxl"})}}

    def load(self, family):
        return self.models[family]["model"], self.models[family]["clip"], None


class _LatentToImage:
    """Test stand-in for VAE Decode: the latent's first three channels, squashed into 0..1, upsampled 8x."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        image = torch.sigmoid(samples["samples"][:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
        return (image.movedim(1, -1).contiguous(),)


class _ReferenceLatent:
    """Test stand-in for VAE Encode of the reference image: a seeded latent in the raw VAE space."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {}}

    def encode(self):
        generator = torch.Generator().manual_seed(7)
        return ({"samples": torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator) * 5.0},)


def _core_nodes() -> dict:
    """The comfy_extras nodes the workflows use (the harness loads only nodes.py)."""
    from comfy_extras import nodes_freelunch, nodes_primitive

    found = {"FreeU": nodes_freelunch.FreeU}
    for value in vars(nodes_primitive).values():
        schema = getattr(value, "GET_SCHEMA", None)
        if isinstance(value, type) and callable(schema):
            found[schema().node_id] = value
    return found


def _outputs_of(node_class) -> list[tuple[str, str]]:
    """(type, name) of every output of a V1 or V3 node class."""
    if hasattr(node_class, "GET_SCHEMA"):
        return [(str(output.get_io_type()), output.display_name or output.id or str(output.get_io_type()))
                for output in node_class.GET_SCHEMA().outputs]
    types = list(node_class.RETURN_TYPES)
    names = list(getattr(node_class, "RETURN_NAMES", None) or types)
    return list(zip(types, names, strict=True))


def _output_index(node_class, wanted: str) -> int:
    outputs = _outputs_of(node_class)
    for index, (io_type, name) in enumerate(outputs):
        if wanted in (name, io_type):
            return index
    raise KeyError(f"{node_class.__name__} has no output {wanted!r}: {outputs}")


def api_prompt(graph) -> tuple[dict, list[str]]:
    """The API-format prompt of a workflow graph with the test stand-ins, and the keys of its samplers."""
    mappings = comfy_nodes.NODE_CLASS_MAPPINGS
    prompt: dict = {}
    for node in graph.nodes:
        key, node_type, widgets = node[0], node[1], node[4]
        if node_type not in mappings and node_type != "CheckpointLoaderSimple" and not node_type.startswith("VAE"):
            continue  # Notes, and image post-processing that no sampler depends on
        inputs = {name: value for name, value in widgets.items() if name not in UI_ONLY_WIDGETS}
        if node_type == "CheckpointLoaderSimple":
            node_type, inputs = "TinyCheckpoint", {"family": "sd15" if inputs["ckpt_name"] == SD15_CHECKPOINT
                                                   else "sdxl"}
        elif node_type == "VAEDecode":
            node_type, inputs = "LatentToImage", {}
        elif node_type == "VAEEncode":
            node_type, inputs = "ReferenceLatent", {}
        elif node_type == "KSampler":
            inputs["steps"] = STEPS
        for size_input in ("width", "height"):
            if size_input in inputs and node_type in ("SpectralStoryPrompts", "EmptyLatentImage"):
                inputs[size_input] = SIZE
        prompt[key] = {"class_type": node_type, "inputs": inputs}
    for source, output, target, input_name in graph.links:
        if source not in prompt or target not in prompt:
            continue
        if prompt[target]["class_type"] in ("LatentToImage", "ReferenceLatent") and input_name != "samples":
            continue  # the stand-ins need no VAE and no pixels
        source_class = mappings[prompt[source]["class_type"]]
        prompt[target]["inputs"][input_name] = [source, _output_index(source_class, output)]
    samplers = [key for key, node in prompt.items() if node["class_type"] in SAMPLERS]
    for key in samplers:
        prompt[f"record_{key}"] = {"class_type": "Record", "inputs": {"value": [key, 0], "key": key}}
    return prompt, samplers


def fingerprint(latents: list[dict]) -> list:
    """Every run's latent, average-pooled to 8x8, divided by the run's largest magnitude and rounded to 1e-4:
    [runs] of {"scale": the largest magnitude, "pooled": [images][channels][8][8]}.

    The tiny random models' latents reach magnitudes of ~200, where float32 rounding alone is ~1e-5: relative to
    the run's scale, 1e-4 means what it says (a change well above float rounding).
    """
    prints = []
    for latent in latents:
        samples = latent["samples"].detach().double()
        scale = float(samples.abs().max())
        reduced = torch.nn.functional.adaptive_avg_pool2d(samples, POOLED) / scale
        prints.append({"scale": scale, "pooled": torch.round(reduced * 1e4).div(1e4).tolist()})
    return prints


@pytest.fixture(scope="module")
def registered():
    _TinyCheckpoint.models = {family: {"model": tiny_model_for_clip(family), "clip": tiny_clip(family)}
                              for family in ("sdxl", "sd15")}
    stand_ins = {"TinyCheckpoint": _TinyCheckpoint, "LatentToImage": _LatentToImage,
                 "ReferenceLatent": _ReferenceLatent, "Record": RecordNode, **_core_nodes(),
                 **{cls.GET_SCHEMA().node_id: cls for cls in node_list()}}
    mappings = comfy_nodes.NODE_CLASS_MAPPINGS
    saved = {name: mappings.get(name) for name in stand_ins}
    mappings.update(stand_ins)
    recorded = {name: None for name in WORKFLOWS} if WRITE else None
    yield recorded
    for name, node_class in saved.items():
        if node_class is None:
            mappings.pop(name, None)
        else:
            mappings[name] = node_class
    if WRITE and all(value is not None for value in recorded.values()):
        FINGERPRINTS.parent.mkdir(parents=True, exist_ok=True)
        FINGERPRINTS.write_text(json.dumps(recorded, separators=(",", ":")) + "\n")


def _max_difference(actual, expected) -> float:
    return float((torch.tensor(actual, dtype=torch.float64) - torch.tensor(expected, dtype=torch.float64))
                 .abs().max())


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_shipped_workflow_gives_the_recorded_latents(registered, name):
    prompt, samplers = api_prompt(WORKFLOWS[name])
    assert samplers, "every shipped workflow samples"
    RecordNode.seen = {}
    executor = run_prompt(prompt)
    assert executor.success, executor.status_messages[-1]
    prints = {key: fingerprint(RecordNode.seen[key]) for key in samplers}
    if WRITE:
        registered[name] = prints
        return
    expected = json.loads(FINGERPRINTS.read_text())[name]
    assert sorted(prints) == sorted(expected)
    for key in samplers:
        assert len(prints[key]) == len(expected[key]), key
        for actual, stored in zip(prints[key], expected[key], strict=True):
            assert abs(actual["scale"] - stored["scale"]) <= TOLERANCE * stored["scale"], (name, key)
            assert torch.tensor(actual["pooled"]).shape == torch.tensor(stored["pooled"]).shape, key
            # Both sides are rounded to 1e-4: a value on a rounding edge may move by one unit.
            assert _max_difference(actual["pooled"], stored["pooled"]) <= TOLERANCE + 1e-9, (name, key)
