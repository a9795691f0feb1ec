"""bench/gpu_check.py's reduced form runs on the CPU, so the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import re

from comfy_harness import PACK_ROOT


def test_gpu_check_smoke_prints_every_figure(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", PACK_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.count("layer T=") == 2 and "UNet step" in out
    for name in ("plain", "extended", "extended + K quantile(0.05)", "extended + V log_squared -> energy(0.95)",
                 "extended + both (character sheet)"):
        assert name in out
    ratios = [float(value) for value in re.findall(r"x\s*([0-9.]+) of plain", out)]
    assert len(ratios) == 2 * 5 + 3 and all(ratio > 0 for ratio in ratios)
