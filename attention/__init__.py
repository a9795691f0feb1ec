"""The method in plain PyTorch (shared/METHOD.md). Nothing in this package imports ComfyUI."""
