"""SpectralTruncate and SpectralReweight: build SPECTRUM chains for the anchors' keys and values."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.spectrum import (
    EXP_ALPHA_MAX,
    EXP_ALPHA_MIN,
    METHODS,
    REWEIGHT_MODES,
    TRUNCATE_MODES,
    Reweight,
    Spectrum,
    Truncate,
    validate_reweight,
    validate_truncate,
)
from .io_types import Spectrum as SpectrumSocket
from .search_aliases import search_aliases

MAX_FIXED_COUNT = 4096  # SDXL's largest token grid; no K or V matrix there has more singular values

_CHAIN_TOOLTIP = ("Optional earlier steps of the chain; they are applied first, and this step sees their output "
                  "spectrum. Leave empty to start a new chain.")


def _extend(spectrum: Spectrum | None, step, method: str | None = None) -> Spectrum:
    chain = spectrum if spectrum is not None else Spectrum()
    if method is not None and method != chain.method:
        chain = Spectrum(chain.steps, method=method)
    return chain.then(step)


def _truncate_problem(mode: str, value: float) -> str | None:
    try:
        validate_truncate(mode, value)
    except ValueError as error:
        return f"Spectral Truncate, input 'value': {error}"
    return None


def _reweight_problem(mode: str, alpha: float) -> str | None:
    try:
        validate_reweight(mode, alpha)
    except ValueError as error:
        return f"Spectral Reweight, input 'alpha': {error}"
    return None


class SpectralTruncate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralTruncate",
            display_name="Spectral Truncate",
            category="spectral_anchors",
            **search_aliases("spectrum", "svd", "singular values"),
            description=(
                "Zero the small singular values of the anchors' keys or values before other images see them. "
                "Connect the output to key_spectrum or value_spectrum of Spectral Anchor Attention. Research "
                "recommendation: keys keep 1-5 % (quantile 0.01-0.05; 10 % or more brings background artefacts), "
                "values keep 5-10 %."
            ),
            inputs=[
                io.Combo.Input("mode", options=list(TRUNCATE_MODES), default="quantile",
                               tooltip="fixed: keep the N largest values. quantile: keep the largest fraction q "
                                       "(0.05 was best for most prompts). energy: keep the fewest values holding "
                                       "the fraction q of the energy (sum of squares); needs at least 0.9 to help "
                                       "and is very sensitive above that."),
                io.Float.Input("value", default=0.05, min=0.0, max=float(MAX_FIXED_COUNT), step=0.001,
                               tooltip="fixed: how many values to keep (a whole number, 1 or more). quantile and "
                                       "energy: the fraction q, with 0 < q <= 1."),
                SpectrumSocket.Input("spectrum", optional=True, tooltip=_CHAIN_TOOLTIP),
                io.Combo.Input("solver", options=list(METHODS), default="exact", optional=True,
                               tooltip="exact (recommended): as close to an exact SVD as the input's precision "
                                       "allows, checked on every matrix (a certified fast solver where few values "
                                       "are kept, else the full decomposition). lowrank: a randomized low-rank SVD, "
                                       "an unchecked approximation, faster only when very few values are kept; it "
                                       "applies to the whole chain."),
            ],
            outputs=[SpectrumSocket.Output(display_name="spectrum", tooltip="The chain, ending with this step.")],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None, value: float | None = None) -> bool | str:
        # At queue time a linked input (a Primitive node, a sweep) arrives as None: execute checks it then.
        if mode is None or value is None:
            return True
        message = _truncate_problem(mode, value)
        return True if message is None else message

    @classmethod
    def execute(cls, mode: str, value: float, spectrum: Spectrum | None = None,
                solver: str = "exact") -> io.NodeOutput:
        message = _truncate_problem(mode, value)
        if message is not None:
            raise ValueError(message)
        return io.NodeOutput(_extend(spectrum, Truncate(mode, value), solver))


class SpectralReweight(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralReweight",
            display_name="Spectral Reweight",
            category="spectral_anchors",
            **search_aliases("spectrum", "svd", "singular values"),
            description=(
                "Reshape the spectrum of the anchors' keys or values, keeping its overall size (L2 norm). "
                "log_squared gave the best single result in the research; log also raised consistency (with some "
                "background leakage); exp lowered it and is kept for study. Chain it before Spectral Truncate to "
                "flatten the spectrum and then drop the tail that carries background."
            ),
            inputs=[
                io.Combo.Input("mode", options=list(REWEIGHT_MODES), default="log_squared",
                               tooltip="log: s -> max(ln s, 0), flattens the spectrum. log_squared: (max(ln s, 0))^2, "
                                       "best in the research. exp: s -> s * exp(alpha * s / s_max), sharpens it."),
                io.Float.Input("alpha", default=1.0, min=EXP_ALPHA_MIN, max=EXP_ALPHA_MAX, step=0.01,
                               tooltip="Strength of exp (other modes ignore it). The research writes "
                                       "s * exp(alpha * s), which overflows for real keys and values (their singular "
                                       "values reach the thousands); dividing by the largest value s_max makes alpha "
                                       "scale-free. Positive sharpens, negative flattens."),
                SpectrumSocket.Input("spectrum", optional=True, tooltip=_CHAIN_TOOLTIP),
            ],
            outputs=[SpectrumSocket.Output(display_name="spectrum", tooltip="The chain, ending with this step.")],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None, alpha: float | None = None) -> bool | str:
        # At queue time a linked input arrives as None: execute checks it then.
        if mode is None or alpha is None:
            return True
        message = _reweight_problem(mode, alpha)
        return True if message is None else message

    @classmethod
    def execute(cls, mode: str, alpha: float, spectrum: Spectrum | None = None) -> io.NodeOutput:
        message = _reweight_problem(mode, alpha)
        if message is not None:
            raise ValueError(message)
        return io.NodeOutput(_extend(spectrum, Reweight(mode, alpha)))
