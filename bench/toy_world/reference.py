"""Record the shipped model's vanilla metrics, which tests/bench/test_toy_world.py reproduces.

    OMP_NUM_THREADS=1 .venv/bin/python bench/toy_world/reference.py     # rewrites reference_metrics.json

Run it after regenerating the weights (train.py). One thread, like the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TOY_DIR = Path(__file__).resolve().parent
REFERENCE_PATH = TOY_DIR / "reference_metrics.json"
REFERENCE_SEEDS = (0, 1, 2, 3)


def vanilla_metrics(model_patcher, vocab, detector, seeds=REFERENCE_SEEDS) -> dict[str, dict[str, float]]:
    from . import story

    return {str(seed): story.run_story(model_patcher, vocab, detector, seed) for seed in seeds}


def main() -> None:
    repo = TOY_DIR.parents[1]
    sys.path.insert(0, str(repo / "tests"))
    sys.path.insert(0, str(repo))
    torch.set_num_threads(1)
    from comfy_harness import boot_comfy

    boot_comfy()
    from bench.toy_world import model as toy_model
    from bench.toy_world import story
    from bench.toy_world.detector import Detector
    from bench.toy_world.reference import vanilla_metrics as measure

    model, vocab, config, metadata = toy_model.load()
    detector = Detector(config.size)
    record = {"weights": toy_model.WEIGHTS_PATH.name, "weights_settings": metadata.get("settings"),
              "sampler": {"sampler": story.SAMPLER, "scheduler": story.SCHEDULER, "steps": story.STEPS,
                          "cfg": story.CFG, "anchors": story.ANCHORS, "story_size": story.STORY_SIZE},
              "vanilla": measure(model, vocab, detector)}
    REFERENCE_PATH.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
