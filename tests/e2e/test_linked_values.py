"""Queue-time checks through the real server's /prompt: linked widget values are checked when the node runs,
constant bad values are refused when the prompt is queued, and each refusal names the node and the input.

No SDXL is needed: the SPECTRUM chains end in core PreviewAny, and the attention node's model input is a
placeholder checkpoint that validation only looks up by name (its prompts are refused before anything loads).
"""

from __future__ import annotations

import pytest
from e2e_support import ComfyServer

CHECKPOINT = "linked_values_placeholder.safetensors"


def truncate_prompt(value, mode: str = "quantile") -> dict:
    """SpectralTruncate -> PreviewAny; value is a constant, or a PrimitiveFloat's value when given as ('link', x)."""
    prompt = {
        "2": {"class_type": "SpectralTruncate", "inputs": {"mode": mode, "value": value, "solver": "exact"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    if isinstance(value, tuple):
        prompt["1"] = {"class_type": "PrimitiveFloat", "inputs": {"value": value[1]}}
        prompt["2"]["inputs"]["value"] = ["1", 0]
    return prompt


def reweight_prompt(alpha, mode: str = "exp") -> dict:
    prompt = {
        "2": {"class_type": "SpectralReweight", "inputs": {"mode": mode, "alpha": alpha}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    if isinstance(alpha, tuple):
        prompt["1"] = {"class_type": "PrimitiveFloat", "inputs": {"value": alpha[1]}}
        prompt["2"]["inputs"]["alpha"] = ["1", 0]
    return prompt


def node_errors(payload: dict, node_id: str) -> list[dict]:
    return payload.get("node_errors", {}).get(node_id, {}).get("errors", [])


def run(server: ComfyServer, prompt: dict) -> dict:
    status, payload = server.queue(prompt)
    assert status == 200, f"/prompt refused a prompt it should accept: {payload}"
    return server.wait_for_history(payload["prompt_id"], timeout=120)


def execution_error(entry: dict) -> dict | None:
    for kind, message in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return message
    return None


@pytest.mark.parametrize("build, good, bad, input_name", [
    (truncate_prompt, 0.05, 2.5, "value"),
    (reweight_prompt, 2.0, 25.0, "alpha"),
])
def test_linked_values_are_accepted_at_queue_time_and_checked_when_run(comfy_server: ComfyServer, build, good, bad,
                                                                        input_name):
    entry = run(comfy_server, build(("link", good)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    entry = run(comfy_server, build(("link", bad)))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error is not None and error["node_id"] == "2"
    assert f"input '{input_name}'" in error["exception_message"]


@pytest.mark.parametrize("build, bad, input_name", [
    (truncate_prompt, 2.5, "value"),
    (reweight_prompt, 25.0, "alpha"),
])
def test_constant_bad_values_are_still_refused_at_queue_time(comfy_server: ComfyServer, build, bad, input_name):
    status, payload = comfy_server.queue(build(bad))
    assert status == 400
    errors = node_errors(payload, "2")
    assert errors and all(f"input '{input_name}'" in error["details"] for error in errors)


def attention_prompt(comfy_server: ComfyServer, **inputs) -> dict:
    comfy_server.model_file("checkpoints", CHECKPOINT)
    attention = {"model": ["1", 0], "anchors": 2, "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0,
                 **inputs}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "SpectralAnchorAttention", "inputs": attention},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }


def test_subject_masks_without_a_story_are_refused_at_queue_time_once(comfy_server: ComfyServer):
    status, payload = comfy_server.queue(attention_prompt(comfy_server, subject_masks=True))
    assert status == 400
    errors = node_errors(payload, "2")
    # One queue-time check over one input: ComfyUI reports a failed check once per input the check takes.
    assert len(errors) == 1
    assert "Spectral Anchor Attention, input 'story'" in errors[0]["details"]


def test_subject_masks_off_passes_queue_time_validation(comfy_server: ComfyServer):
    # The placeholder checkpoint fails only when the prompt runs: validation itself passes.
    for inputs in ({"subject_masks": False}, {}):
        status, payload = comfy_server.queue(attention_prompt(comfy_server, **inputs))
        assert status == 200, payload
        comfy_server.wait_for_history(payload["prompt_id"], timeout=120)
