"""SpectralReferenceAnchors on the real ComfyUI: tiny SDXL / SD1.5 UNets sampled through comfy.sample (the stock
KSampler path), eps- and v-prediction (ComfyUI's own ModelSamplingDiscrete node), and ComfyUI's executor for the
error path. Batches are built by hand: the first R rows are the reference rows, the rest are targets.
"""

from __future__ import annotations

import comfy.patcher_extension
import comfy.sample
import pytest
import torch
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
from comfy_harness import conditioning, tiny_model

import nodes as comfy_nodes
from spectral_anchors.attention.spectrum import Reweight, Spectrum, Truncate
from spectral_anchors.nodes import node_list
from spectral_anchors.nodes.anchor_attention_node import SpectralAnchorAttention
from spectral_anchors.nodes.feature_injection_node import SpectralFeatureInjection
from spectral_anchors.nodes.reference_anchors import fit_to
from spectral_anchors.nodes.reference_anchors_node import SpectralReferenceAnchors
from spectral_anchors.nodes.run_context import REFERENCE_RUN_KEY as REFERENCE_KEY

LATENT = (4, 16, 24)  # non-square on purpose
REFERENCES = 2
IMAGES = 4  # two reference rows, two targets
# A VAE-encoded SDXL / SD1.5 latent has a standard deviation of about 1 / scale_factor (5-8): the references are
# given in that raw space, like VAE Encode's output, and the sampler works after process_in.
RAW_SCALE = 6.0


def references(count=REFERENCES, seed=11, size=LATENT):
    generator = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(count, *size, generator=generator) * RAW_SCALE}


def attention(model, anchors=REFERENCES, start=0.01, end=1.0, **options):
    return SpectralAnchorAttention.execute(model, anchors, "decoder", start, end, **options).result[0]


def with_references(model, reference=None, noise_seed=5):
    reference = references() if reference is None else reference
    return SpectralReferenceAnchors.execute(model, reference, noise_seed).result[0]


def prompts(family, images=IMAGES, seed=1):
    return conditioning(family, images, seed), conditioning(family, 1, 99)


def noise_of(images=IMAGES, seed=3, size=LATENT):
    return torch.randn(images, *size, generator=torch.Generator().manual_seed(seed))


def run(model, family, images=IMAGES, cfg=5.0, sampler="euler", steps=4, noise=None, positive=None, latent=None,
        size=LATENT, callback=None):
    pos, neg = prompts(family, images)
    latent = torch.zeros(images, *size) if latent is None else latent
    noise = noise_of(images, size=size) if noise is None else noise
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive or pos, neg, latent,
                               callback=callback, disable_pbar=True, seed=3)


def relative_error(result, expected):
    return float((result - expected).abs().max() / expected.abs().max())


def close(a, b, tolerance=1e-5):
    return bool(torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max())))


def v_prediction(model, zsnr):
    return ModelSamplingDiscrete().patch(model, "v_prediction", zsnr)[0]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_reference_rows_come_out_equal_to_the_references(model, family, cfg, sampler):
    reference = references()
    out = run(with_references(attention(model), reference), family, cfg=cfg, sampler=sampler)
    assert relative_error(out[:REFERENCES], reference["samples"]) < 1e-5
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampling,zsnr", [("eps", False), ("v_prediction", False), ("v_prediction", True)])
def test_eps_and_v_prediction_models(sampling, zsnr):
    """ComfyUI's ModelSamplingDiscrete node makes the model v-prediction (SD2.x v) or zero-terminal-SNR."""
    base = ModelSamplingDiscrete().patch(tiny_model("sdxl"), sampling, zsnr)[0]
    reference = references()
    for cfg in (1.0, 5.0):
        out = run(with_references(attention(base), reference), "sdxl", cfg=cfg, steps=5)
        assert relative_error(out[:REFERENCES], reference["samples"]) < 1e-5
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampling,zsnr", [("eps", False), ("v_prediction", True)])
def test_reference_rows_see_the_reference_noised_with_one_fixed_noise_and_predict_it(sampling, zsnr):
    """At every model call, in every chunk: input = model_sampling.noise_scaling(sigma, noise_r, z_r) with one
    noise for the whole run (from noise_seed), and the denoised estimate the sampler gets is z_r."""
    base = ModelSamplingDiscrete().patch(tiny_model("sdxl"), sampling, zsnr)[0]
    reference = references()
    patched = with_references(attention(base), reference, noise_seed=9).clone()
    model_sampling = patched.get_model_object("model_sampling")
    z = patched.model.process_latent_in(reference["samples"])
    expected_noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    seen = []

    def probe(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs["transformer_options"]
        chunks = len(options["cond_or_uncond"])
        per_chunk = x.shape[0] // chunks
        for chunk in range(chunks):
            rows = slice(chunk * per_chunk, chunk * per_chunk + REFERENCES)
            expected = model_sampling.noise_scaling(t[rows], expected_noise.clone(), z)
            seen.append((float(t[0]), relative_error(x[rows], expected)))
        return executor(x, t, *args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.probe", probe)
    denoised = []
    run(patched, "sdxl", steps=5, callback=lambda step, x0, x, total: denoised.append(x0[:REFERENCES].clone()))
    assert len({sigma for sigma, _ in seen}) == 5 and len(seen) == 10  # 5 calls x (cond, uncond)
    assert max(error for _, error in seen) < 1e-6
    assert len(denoised) == 5 and all(torch.equal(x0, z) for x0 in denoised)


def test_the_sampler_input_of_the_reference_rows_is_irrelevant(model, family):
    patched = with_references(attention(model))
    noise = noise_of()
    base = run(patched, family, noise=noise)
    other_noise, other_latent = noise.clone(), torch.zeros(IMAGES, *LATENT)
    other_noise[:REFERENCES] = torch.randn(REFERENCES, *LATENT)
    other_latent[:REFERENCES] = torch.randn(REFERENCES, *LATENT) * RAW_SCALE
    other = run(patched, family, noise=other_noise, latent=other_latent)
    assert close(other, base)


def test_a_target_does_not_depend_on_the_other_targets(model, family):
    patched = with_references(attention(model))
    images = REFERENCES + 2
    positive, _ = prompts(family, images)
    noise = noise_of(images)
    base = run(patched, family, images=images, noise=noise, positive=positive)

    changed_prompts = [[positive[0][0].clone(), dict(positive[0][1])]]
    changed_prompts[0][0][-1] = torch.randn_like(changed_prompts[0][0][-1])
    if "pooled_output" in changed_prompts[0][1]:
        changed_prompts[0][1]["pooled_output"] = positive[0][1]["pooled_output"].clone()
        changed_prompts[0][1]["pooled_output"][-1] += 1.0
    changed_noise = noise.clone()
    changed_noise[-1] = torch.randn_like(changed_noise[-1])
    changed = run(patched, family, images=images, noise=changed_noise, positive=changed_prompts)

    assert close(changed[:-1], base[:-1])  # the references and the first target
    assert not close(changed[-1], base[-1], 1e-2)


def test_sharing_off_leaves_the_targets_as_without_references(model, family):
    noise = noise_of()
    positive, negative = prompts(family)
    targets_positive = [[positive[0][0][REFERENCES:], {
        key: (value[REFERENCES:] if key == "pooled_output" else value) for key, value in positive[0][1].items()}]]
    alone = comfy.sample.sample(model, noise[REFERENCES:], 4, 5.0, "euler", "normal", targets_positive, negative,
                                torch.zeros(IMAGES - REFERENCES, *LATENT), disable_pbar=True, seed=3)
    off = run(with_references(attention(model, start=0.5, end=0.5)), family, noise=noise)
    on = run(with_references(attention(model)), family, noise=noise)
    tolerance = 1e-5  # batching differences (4 rows against 2) stay far below it
    assert close(off[REFERENCES:], alone, tolerance)
    assert relative_error(off[:REFERENCES], references()["samples"]) < 1e-5
    # Sharing on: the references reach the targets, far above that tolerance.
    assert relative_error(on[REFERENCES:], alone) > 100 * tolerance


def test_references_shape_the_targets_unlike_generated_anchors(model, family):
    noise = noise_of()
    generated = run(attention(model), family, noise=noise)
    first = run(with_references(attention(model), references(seed=11)), family, noise=noise)
    other = run(with_references(attention(model), references(seed=12)), family, noise=noise)
    other_seed = run(with_references(attention(model), references(seed=11), noise_seed=6), family, noise=noise)
    for result in (generated, other, other_seed):  # each far above float32 rounding (about 1e-7 here)
        assert relative_error(first[REFERENCES:], result[REFERENCES:]) > 1e-4
    assert relative_error(other_seed[:REFERENCES], references(seed=11)["samples"]) < 1e-5


def test_before_or_after_spectral_anchor_attention_is_the_same(model, family):
    reference = references()
    after = run(with_references(attention(model), reference), family)
    before = run(attention(with_references(model, reference)), family)
    assert torch.equal(after, before)


def test_two_runs_identical_input_model_untouched_and_state_cleared(model, family):
    options_before, wrappers_before = repr(model.model_options), repr(model.wrappers)
    patched = with_references(attention(model))
    first = run(patched, family)
    second = run(patched, family)
    assert torch.equal(first, second)
    assert repr(model.model_options) == options_before and repr(model.wrappers) == wrappers_before
    assert REFERENCE_KEY not in repr(patched.model_options)


def test_a_reference_of_another_size_is_resized_with_a_centre_crop(model, family):
    reference = references(size=(4, 20, 20))
    out = run(with_references(attention(model), reference), family)
    assert relative_error(out[:REFERENCES], fit_to(reference["samples"], *LATENT[1:])) < 1e-5


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_with_spectra_query_blending_and_feature_injection(cfg):
    model = tiny_model("sdxl")
    spectra = dict(key_spectrum=Spectrum((Truncate("quantile", 0.05),)),
                   value_spectrum=Spectrum((Reweight("log_squared"), Truncate("energy", 0.95))))
    shared = attention(model, query_blending=True, **spectra)
    injected = SpectralFeatureInjection.execute(shared, 0.8, 0.1, 0.5, "finest", REFERENCES, "two-pass").result[0]
    reference = references()
    plain = run(injected, "sdxl", cfg=cfg, steps=10)
    out = run(with_references(injected, reference), "sdxl", cfg=cfg, steps=10)
    assert relative_error(out[:REFERENCES], reference["samples"]) < 1e-5
    assert torch.isfinite(out).all() and relative_error(out[REFERENCES:], plain[REFERENCES:]) > 1e-3


def test_a_batch_of_only_references_and_one_reference(model, family):
    reference = references(count=1)
    out = run(with_references(attention(model, anchors=1), reference), family, images=1)
    assert relative_error(out, reference["samples"]) < 1e-5
    out = run(with_references(attention(model, anchors=1), reference), family, images=3)
    assert relative_error(out[:1], reference["samples"]) < 1e-5


def test_bad_inputs_name_the_node_and_the_input(model):
    node = "Spectral Reference Anchors, input 'reference'"
    shared = attention(model)
    with pytest.raises(ValueError, match=rf"{node}: 3 reference images, but Spectral Anchor Attention's input "
                                         r"'anchors' is 2"):
        with_references(shared, references(count=3))
    with pytest.raises(ValueError, match=rf"{node}: the latent has 16 channels but this model works with 4"):
        with_references(shared, {"samples": torch.randn(2, 16, 16, 24)})
    with pytest.raises(ValueError, match=rf"{node}: the latent is empty"):
        with_references(shared, {"samples": torch.zeros(0, 4, 16, 24)})
    with pytest.raises(ValueError, match=rf"{node}: the latent is all zeros.*Empty Latent Image"):
        with_references(shared, {"samples": torch.zeros(2, 4, 16, 24)})
    with pytest.raises(ValueError, match=rf"{node}: 9 images; at most 8"):
        with_references(attention(model, anchors=9), references(count=9))
    with pytest.raises(ValueError, match=rf"{node}: a latent of shape \[2, 4, 3, 16, 24\]"):
        with_references(shared, {"samples": torch.randn(2, 4, 3, 16, 24)})
    with pytest.raises(ValueError, match=rf"{node}: this is not a LATENT"):
        with_references(shared, torch.randn(2, 4, 16, 24))
    with pytest.raises(ValueError, match=rf"{node}: the latent contains NaN"):
        with_references(shared, {"samples": torch.full((2, 4, 16, 24), float("nan"))})


def test_mismatches_found_when_sampling_starts(model, family):
    """The node before Spectral Anchor Attention (or with feature injection alone): checked at sampling time."""
    with pytest.raises(ValueError, match=r"Spectral Reference Anchors, input 'reference': 3 reference images, but "
                                         r"Spectral Anchor Attention's input 'anchors' is 2"):
        run(attention(with_references(model, references(count=3))), family)
    injection_only = SpectralFeatureInjection.execute(model, 0.8, 0.1, 0.5, "finest", 3, "two-pass").result[0]
    with pytest.raises(ValueError, match=r"but Spectral Feature Injection's input 'anchors' is 3"):
        run(with_references(injection_only), family)
    with pytest.raises(ValueError, match=r"input 'reference': 2 references but the sampled batch holds only 1"):
        run(with_references(attention(model)), family, images=1)
    sd3_sized = with_references(attention(model))
    with pytest.raises(ValueError, match=r"input 'reference': the references have 4 channels but the sampled latent "
                                         r"has 16"):
        run(sd3_sized, family, size=(16, 16, 24))


def test_registered_with_tooltips():
    assert SpectralReferenceAnchors in node_list()
    schema = SpectralReferenceAnchors.GET_SCHEMA()
    assert [item.id for item in schema.inputs] == ["model", "reference", "noise_seed"]
    assert all(item.tooltip for item in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [o.io_type for o in schema.outputs] == ["MODEL"]


class _TinyModelForTest:
    """Stands in for a checkpoint loader: ComfyUI's model detection rejects tiny configs."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's V1 node API
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (tiny_model("sdxl"),)


class _TinyPromptsForTest:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"images": ("INT", {"default": 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, images):
        return (conditioning("sdxl", images, images),)


class _ReferenceLatentForTest:
    """What VAE Encode gives (random content in the raw VAE space), without a VAE."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"images": ("INT", {"default": 2})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, images):
        return ({"samples": torch.randn(images, 4, 16, 16) * RAW_SCALE},)


class _MessageSink:
    """What PromptExecutor reports to: the server's websocket side, here a list."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def test_errors_reach_comfyui_through_its_own_executor(monkeypatch):
    import execution
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    for name, node_class in (("EmptySD3LatentImage", EmptySD3LatentImage),
                             ("SpectralReferenceAnchors", SpectralReferenceAnchors),
                             ("SpectralAnchorAttention", SpectralAnchorAttention),
                             ("TinyModelForTest", _TinyModelForTest), ("TinyPromptsForTest", _TinyPromptsForTest),
                             ("ReferenceLatentForTest", _ReferenceLatentForTest)):
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, node_class)

    def execute(reference_node, references_first=False, anchors=2):
        model_chain = {"3": {"class_type": "SpectralAnchorAttention",
                             "inputs": {"model": ["2" if references_first else "1", 0], "anchors": anchors,
                                        "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0}},
                       "2": {"class_type": "SpectralReferenceAnchors",
                             "inputs": {"model": ["1", 0] if references_first else ["3", 0], "reference": ["5", 0],
                                        "noise_seed": 0}}}
        sampled = "3" if references_first else "2"
        prompt = {"1": {"class_type": "TinyModelForTest", "inputs": {}}, **model_chain, "5": reference_node,
                  "6": {"class_type": "TinyPromptsForTest", "inputs": {"images": 4}},
                  "7": {"class_type": "TinyPromptsForTest", "inputs": {"images": 1}},
                  "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 4}},
                  "4": {"class_type": "KSampler",
                        "inputs": {"model": [sampled, 0], "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                   "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
                                   "latent_image": ["8", 0], "denoise": 1.0}}}
        sink = _MessageSink()
        executor = execution.PromptExecutor(sink, cache_type=execution.CacheType.NONE, cache_args={"ram": 0.0})
        executor.execute(prompt, "test", {}, ["4"])
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        successes = [data for event, data in executor.status_messages if event == "execution_success"]
        return errors, successes

    errors, successes = execute({"class_type": "ReferenceLatentForTest", "inputs": {"images": 2}})
    assert not errors and successes
    cases = [
        ({"class_type": "ReferenceLatentForTest", "inputs": {"images": 3}}, False, "2",
         "input 'reference': 3 reference images, but Spectral Anchor Attention's input 'anchors' is 2"),
        ({"class_type": "ReferenceLatentForTest", "inputs": {"images": 3}}, True, "4",
         "input 'reference': 3 reference images, but Spectral Anchor Attention's input 'anchors' is 2"),
        ({"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}}, False, "2",
         "input 'reference': the latent is all zeros"),
        ({"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}}, False, "2",
         "input 'reference': the latent has 16 channels but this model works with 4"),
        ({"class_type": "ReferenceLatentForTest", "inputs": {"images": 9}}, False, "2",
         "input 'reference': 9 images; at most 8"),
    ]
    for reference_node, references_first, failing_node, message in cases:
        errors, _ = execute(reference_node, references_first)
        assert len(errors) == 1, (reference_node, errors)
        assert errors[0]["node_id"] == failing_node
        assert errors[0]["exception_message"].startswith("Spectral Reference Anchors, " + message)
