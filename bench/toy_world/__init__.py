"""The toy world: the project's CPU measuring instrument for consistency and background leakage.

world.py (generator), model.py (tiny SDXL-architecture UNet, v-prediction + zero-terminal-SNR, vocabulary),
train.py (regenerates the shipped weights), detector.py (detector and metrics), story.py (one sampled story),
reference.py (recorded vanilla metrics), references.py (reference images of one subject), spectra.py (K / V
spectrum diagnostics), render.py (pictures).
"""
