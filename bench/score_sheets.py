"""Score folders of saved sheets with a CLIP vision model, through the Spectral Consistency Score node's own code.

For reproducing the field's consistency benchmark (e.g. the ConsiStory+ prompt sets) with this pack on a GPU:
sample each prompt set as one sheet, save its frames (Save Image writes them in batch order, anchors first), one
folder per sheet, then

    python bench/score_sheets.py SHEETS_FOLDER --clip-vision models/clip_vision/CLIP-ViT-bigG-14.safetensors

Every subfolder of SHEETS_FOLDER that holds images is one sheet (and so are images directly in SHEETS_FOLDER);
frames are taken in natural file-name order (frame_2 before frame_10). The model file is loaded with ComfyUI's
own clip_vision loader (what Load CLIP Vision does), the frames are scored by SpectralConsistencyScore.execute,
and a table is printed per sheet, then one line per sheet. ComfyUI is imported as a library: COMFYUI_PATH names
your ComfyUI checkout (default: the pinned tree of `make setup`). Only .safetensors files are read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def boot_comfy(cpu: bool) -> None:
    """Import ComfyUI as a library with only the arguments given here (the tests' harness, without forcing --cpu)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_root import comfy_root

    root = comfy_root(prepare=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]] + (["--cpu"] if cpu else [])
    try:
        import comfy.model_management  # noqa: F401  (reads the arguments at import)
        import utils.extra_config  # noqa: F401  (must precede nodes: nodes puts comfy/ first on sys.path)
        import utils.install_util  # noqa: F401

        import nodes  # noqa: F401
    finally:
        sys.argv = saved_argv


def load_pack():
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_harness import load_pack as load

    return load()


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def image_files(folder: Path) -> list[Path]:
    return sorted((path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES),
                  key=natural_key)


def find_sheets(folder: Path) -> list[tuple[str, list[Path]]]:
    sheets = []
    if image_files(folder):
        sheets.append((folder.name, image_files(folder)))
    for child in sorted((path for path in folder.iterdir() if path.is_dir()), key=natural_key):
        if image_files(child):
            sheets.append((child.name, image_files(child)))
    return sheets


def load_images(paths: list[Path]):
    """An IMAGE batch [B, H, W, 3] in [0, 1]; frames of another size than the first are resized to it (bicubic)."""
    import numpy as np
    import torch
    from PIL import Image

    frames, size, resized = [], None, []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is None:
                size = image.size
            elif image.size != size:
                resized.append(path.name)
                image = image.resize(size, Image.BICUBIC)
            frames.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    if resized:
        print(f"  note: resized to {size[0]}x{size[1]}: {', '.join(resized)}")
    return torch.stack(frames)


def load_clip_vision(path: Path, config: Path | None):
    """ComfyUI's clip_vision loader; with --config, ComfyUI's ClipVisionModel built from that config file (for
    encoders the loader does not recognise by their weights, e.g. a small test model)."""
    import comfy.clip_vision
    import comfy.utils

    if path.suffix != ".safetensors":
        raise SystemExit(f"{path}: only .safetensors files are read.")
    if config is None:
        clip_vision = comfy.clip_vision.load(str(path))
        if clip_vision is None:
            raise SystemExit(f"{path}: ComfyUI's loader does not recognise this CLIP vision file. Give its config "
                             "with --config (in the format of comfy/clip_vision_config_vitl.json).")
        return clip_vision
    json.loads(config.read_text())  # a clear error for a file that is not JSON
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    missing, _ = clip_vision.load_sd(comfy.utils.load_torch_file(str(path), safe_load=True))
    if missing:
        raise SystemExit(f"{path} does not match {config}: missing {', '.join(missing[:5])}")
    return clip_vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of sheets: subfolders of frames (or frames directly)")
    parser.add_argument("--clip-vision", type=Path, required=True, help="a CLIP vision .safetensors file")
    parser.add_argument("--config", type=Path, help="the encoder's config JSON, for files ComfyUI does not detect")
    parser.add_argument("--anchors", type=int, default=2, help="how many of each sheet's first frames are anchors")
    parser.add_argument("--reference", type=Path, help="a folder of reference images to compare targets with")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu)")
    args = parser.parse_args()
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    sheets = find_sheets(args.folder)
    if not sheets:
        parser.error(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.folder} or its subfolders")

    boot_comfy(args.cpu)
    load_pack()
    from spectral_anchors.nodes.consistency_score_node import SpectralConsistencyScore

    clip_vision = load_clip_vision(args.clip_vision, args.config)
    reference = None
    if args.reference is not None:
        reference_files = image_files(args.reference)
        if not reference_files:
            parser.error(f"no images in {args.reference}")
        reference = load_images(reference_files)
    summary = []
    for name, files in sheets:
        print(f"== sheet {name}: {len(files)} images, {args.anchors} anchors")
        images = load_images(files)
        try:
            output = SpectralConsistencyScore.execute(images=images, clip_vision=clip_vision, anchors=args.anchors,
                                                      reference=reference)
        except ValueError as error:
            print(f"  skipped: {error}")
            summary.append((name, len(files), None, None))
            continue
        score, report, _ = output.result
        for number, path in enumerate(files, start=1):
            print(f"  image {number:>3} = {path.name}")
        print("\n".join("  " + line for line in report.splitlines()))
        pairwise = next(line.split()[2] for line in report.splitlines() if line.startswith("pairwise mean:"))
        summary.append((name, len(files), score, pairwise))
    width = max(len(name) for name, *_ in summary)
    print(f"\n{'sheet':<{width}}  images   score  pairwise")
    for name, count, score, pairwise in summary:
        shown = f"{score:7.4f}  {pairwise:>8}" if score is not None else "skipped"
        print(f"{name:<{width}}  {count:>6}  {shown}")


if __name__ == "__main__":
    main()
