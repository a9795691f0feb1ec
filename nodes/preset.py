"""The plain-language presets of Spectral Consistency Preset: each names the settings it stands for.

A preset is data in the vocabulary of the research nodes (Spectral Anchor Attention, Spectral Truncate / Reweight
and Spectral Story Prompts' same_noise), so every preset has an explicit equivalent a user can build by hand and
the help page (web/docs/SpectralConsistencyPreset.md) can state. The choices come from the research's findings
(docs/method.md, section 3) and the toy-world measurements in README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spectrum_node import SpectralReweight, SpectralTruncate

# One step of a SPECTRUM chain: (node id, that node's inputs), applied first to last.
ChainStep = tuple[str, dict]

_STEP_NODES = {"SpectralTruncate": SpectralTruncate, "SpectralReweight": SpectralReweight}

CUSTOM = "custom"


@dataclass(frozen=True)
class PresetSettings:
    """What a preset sets, in the inputs of the research nodes."""

    key_chain: tuple[ChainStep, ...] = ()
    value_chain: tuple[ChainStep, ...] = ()
    layers: str = "decoder"
    start_percent: float = 0.01
    end_percent: float = 1.0
    subject_masks: bool = False
    query_blending: bool = False
    same_noise: bool = False


_RECOMMENDED_K = (("SpectralTruncate", {"mode": "quantile", "value": 0.05}),)
_RECOMMENDED_V = (("SpectralReweight", {"mode": "log_squared", "alpha": 1.0}),
                  ("SpectralTruncate", {"mode": "energy", "value": 0.95}))
_LOG_SQUARED = (("SpectralReweight", {"mode": "log_squared", "alpha": 1.0}),)

# Order is the combo's order: the default first, custom last.
PRESETS: dict[str, PresetSettings] = {
    "recommended": PresetSettings(key_chain=_RECOMMENDED_K, value_chain=_RECOMMENDED_V),
    "stronger identity": PresetSettings(key_chain=_RECOMMENDED_K, value_chain=_RECOMMENDED_V, same_noise=True),
    "more variety": PresetSettings(key_chain=_RECOMMENDED_K, value_chain=_RECOMMENDED_V, query_blending=True,
                                   start_percent=0.1),
    "less background leakage": PresetSettings(key_chain=_LOG_SQUARED, value_chain=_LOG_SQUARED),
    CUSTOM: PresetSettings(),
}
PRESET_NAMES = tuple(PRESETS)
DEFAULT_PRESET = "recommended"


def build_chain(chain: tuple[ChainStep, ...]):
    """The SPECTRUM the research nodes build for this chain (None for an empty chain), through the nodes
    themselves so that a preset and its hand-built equivalent are the same object."""
    spectrum = None
    for node_id, inputs in chain:
        arguments = dict(inputs)
        if spectrum is not None:
            arguments["spectrum"] = spectrum
        spectrum = _STEP_NODES[node_id].execute(**arguments).result[0]
    return spectrum
