"""SpectralReferenceAnchors: the user's own images of the character are the anchors."""

from __future__ import annotations

from comfy_api.latest import io

from .reference_anchors import (
    MAX_REFERENCES,
    NODE_NAME,
    ReferenceSettings,
    apply_reference_anchors,
    check_counts,
    input_error,
    reference_samples,
)


class SpectralReferenceAnchors(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralReferenceAnchors",
            display_name=NODE_NAME,
            category="spectral_anchors",
            description=(
                "Makes your own images of the character the anchors: the first images of every batch are your "
                "references, re-noised to the current level at every step so the other images share their keys "
                "and values, and they come out unchanged. Use it with Spectral Anchor Attention (before or after "
                "it) with anchors = the number of references."
            ),
            inputs=[
                io.Model.Input("model",
                               tooltip="The UNet model (SDXL, SD1.x, SD2.x, eps or v-prediction) to patch, usually "
                                       "with Spectral Anchor Attention on it (before or after this node). The input "
                                       "is not modified."),
                io.Latent.Input("reference",
                                tooltip=f"1 to {MAX_REFERENCES} images of your character, from VAE Encode with the "
                                        "VAE of the checkpoint you sample with. They take the first rows of every "
                                        "batch (whatever the sampler's latent holds there), so their number must "
                                        "equal Spectral Anchor Attention's anchors. Encode them at the sampling "
                                        "size: another size is resized with a centre crop, and scaling the image "
                                        "before VAE Encode gives better quality."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the one fixed noise each reference is re-noised with at every step. "
                                     "The references come out unchanged whatever it is; another seed gives the "
                                     "other images slightly different results."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; feed it to any sampler. The first rows of the "
                                             "sampled batch are the references.")],
        )

    @classmethod
    def execute(cls, model, reference, noise_seed: int = 0) -> io.NodeOutput:
        latent_format = model.get_model_object("latent_format")
        samples = reference_samples(reference, int(latent_format.latent_channels))
        if not 0 <= int(noise_seed) <= 0xFFFFFFFFFFFFFFFF:
            raise input_error("noise_seed", f"{noise_seed} is outside 0..{0xFFFFFFFFFFFFFFFF}.")
        # Checked now when Spectral Anchor Attention comes first; otherwise when sampling starts.
        check_counts(int(samples.shape[0]), model)
        return io.NodeOutput(apply_reference_anchors(model, ReferenceSettings(samples=samples,
                                                                              noise_seed=int(noise_seed))))
