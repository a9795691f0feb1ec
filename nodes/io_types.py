"""The pack's own socket types."""

from comfy_api.latest import io

# An immutable spectrum filter chain (attention/spectrum.py), made by SpectralTruncate / SpectralReweight.
Spectrum = io.Custom("SPECTRUM")
