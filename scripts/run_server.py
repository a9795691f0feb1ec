"""Start the real ComfyUI with this pack in custom_nodes, on 127.0.0.1, CPU when there is no GPU.

All server state (models, input, output, user settings, database) lives in .comfy-state/base, which git
ignores. Drop checkpoints into .comfy-state/base/models/checkpoints.

Arguments after the script's name go to ComfyUI's main.py as they are, e.g. `make run ARGS="--bf16-unet"`
(or `python scripts/run_server.py --bf16-unet`). They come after the flags set here, so a --listen or --port
given again wins (ComfyUI's argument parser keeps the last).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_root import PACK_ROOT, STATE_DIR, comfy_root  # noqa: E402


def prepare_base(base: Path) -> None:
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "spectral-anchors"
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text('{"Comfy.TutorialCompleted": true}\n')


def server_command(root: Path, base: Path, port: int, gpu: bool, extra: list[str] | None = None) -> list[str]:
    command = [sys.executable, str(root / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", f"sqlite:///{base}/user/comfyui.db",
               "--disable-auto-launch"]
    if not gpu:
        command.append("--cpu")
    return command + list(extra or [])


def main(argv: list[str] | None = None) -> None:
    import torch

    extra = list(sys.argv[1:] if argv is None else argv)
    root = comfy_root(prepare=True)
    base = STATE_DIR / "base"
    prepare_base(base)
    port = int(os.environ.get("PORT", "8188"))
    command = server_command(root, base, port, gpu=torch.cuda.is_available(), extra=extra)
    print(f"ComfyUI at http://127.0.0.1:{port}  (state in {base})", flush=True)
    os.chdir(root)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
