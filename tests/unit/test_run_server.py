"""`make run ARGS="..."` hands its flags to ComfyUI's main.py (scripts/run_server.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import run_server  # noqa: E402


def test_extra_flags_follow_the_launchers_own():
    command = run_server.server_command(Path("/comfy"), Path("/base"), 8188, gpu=False,
                                        extra=["--bf16-unet", "--port", "9000"])
    assert command[:2] == [sys.executable, "/comfy/main.py"]
    assert command[-3:] == ["--bf16-unet", "--port", "9000"]
    assert "--cpu" in command and command.index("--cpu") < command.index("--bf16-unet")
    assert run_server.server_command(Path("/comfy"), Path("/base"), 8188, gpu=True)[-1] == "--disable-auto-launch"


def test_make_run_passes_args_through():
    dry_run = subprocess.run(["make", "-n", "run", 'ARGS=--bf16-unet --lowvram'],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    launch = [line for line in dry_run.splitlines() if "scripts/run_server.py" in line]
    assert launch and launch[-1].endswith("scripts/run_server.py --bf16-unet --lowvram")
