"""The pack's own socket types."""

from comfy_api.latest import io

# An immutable spectrum filter chain (attention/spectrum.py), made by SpectralTruncate / SpectralReweight.
Spectrum = io.Custom("SPECTRUM")
# One subject in several scenes (nodes/story.py Story), made by SpectralStoryPrompts.
Story = io.Custom("SPECTRAL_STORY")
