"""The method in plain PyTorch (docs/method.md). Nothing in this package imports ComfyUI."""
