"""Reference anchors on the toy world (a CPU proxy, not an SDXL result).

    OMP_NUM_THREADS=1 .venv/bin/python bench/reference_quality.py             # 16 seeds, 40 min on a busy machine
    OMP_NUM_THREADS=1 .venv/bin/python bench/reference_quality.py --seeds 4

Per seed, the toy story of bench/toy_world/story.py (6 scene prompts, the first 2 rows anchors), sampled through
the real ComfyUI sampler with the pack's nodes, paired on the same seed (same prompts, same target noise):
- vanilla: no sharing;
- generated anchors: Spectral Anchor Attention, the first two images generated from their prompts;
- references: the same, plus Spectral Reference Anchors with two clean world images of ONE subject (same colours and
  pattern, in the two anchor scenes, each with its own random background tint) as the first two rows;
each without and with the example character sheet's spectra (K quantile 0.05, V log_squared -> energy 0.95).

Measured with the benchmark's detector (bench/toy_world/detector.py), targets against the first two rows:
- consistency vs vanilla: the targets' subject appearance distance to the references, as a ratio of vanilla's
  targets' distance to the same references (for generated anchors: to their own anchors, as bench/quality.py does);
- vs generated: the references setting's distance to the references over the generated-anchors setting's distance to
  its anchors, same seed and spectra (below 1: references pull the subject closer than generated anchors do);
- same subject: share of (target, reference) pairs with the reference's exact identity (chance 1/168);
- background pull: 1 - the targets' background tint distance to the references' (anchors') over vanilla's;
- reference error: the largest relative difference between the references and the sampled reference rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / ".comfy-state" / "toy" / "reference_quality"
SHEET_SPECTRA = {"key_spectrum": [("SpectralTruncate", {"mode": "quantile", "value": 0.05})],
                 "value_spectrum": [("SpectralReweight", {"mode": "log_squared", "alpha": 1.0}),
                                    ("SpectralTruncate", {"mode": "energy", "value": 0.95})]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(1)
    from comfy_harness import PACK_NAME, boot_comfy, load_pack

    boot_comfy()
    load_pack()
    from bench.quality import SettingBuilder, mean_sd, run_node, share
    from bench.toy_world import model as toy_model
    from bench.toy_world import story
    from bench.toy_world.detector import Detector, story_metrics
    from bench.toy_world.references import one_subject_references
    from bench.toy_world.render import grid_image

    model, vocab, config, _ = toy_model.load()
    detector = Detector(config.size)
    builder = SettingBuilder(PACK_NAME, None)
    reference_node = builder.nodes["SpectralReferenceAnchors"]
    anchors = story.ANCHORS
    spectra_choices = {"no spectra": {}, "sheet spectra": SHEET_SPECTRA}
    shared = {name: builder.model(model, _setting(share(**inputs))) for name, inputs in spectra_choices.items()}

    rows: dict[str, list[dict]] = {}
    pictures: list[torch.Tensor] = []
    started = time.time()
    for seed in range(args.seeds):
        scenes = story.story_scenes(seed)
        references = one_subject_references(scenes[:anchors], config.size, seed)
        vanilla = story.sample_story(model, vocab, config.size, seed)
        vanilla_to_anchors = story_metrics(detector, vanilla, scenes, anchors)
        vanilla_to_references = story_metrics(detector, torch.cat([references, vanilla[anchors:]]), scenes, anchors)
        if seed == 0:
            pictures += [torch.cat([references, vanilla[anchors:]])]
        for spectra, patched in shared.items():
            generated = story.sample_story(patched, vocab, config.size, seed)
            with_references = run_node(reference_node, {"model": patched, "reference": {"samples": references},
                                                        "noise_seed": seed})
            sampled = story.sample_story(with_references, vocab, config.size, seed)
            error = float((sampled[:anchors] - references).abs().max() / references.abs().max())
            generated_metrics = story_metrics(detector, generated, scenes, anchors)
            reference_metrics = story_metrics(detector, sampled, scenes, anchors)
            rows.setdefault(f"generated anchors, {spectra}", []).append(
                _paired(generated_metrics, vanilla_to_anchors, None, 0.0))
            rows.setdefault(f"references, {spectra}", []).append(
                _paired(reference_metrics, vanilla_to_references, generated_metrics, error))
            if seed == 0:
                pictures += [generated, sampled]
        print(f"seed {seed}: {time.time() - started:.0f} s", flush=True)

    print(f"\nToy-world proxy, not an SDXL result. {args.seeds} seeds paired with vanilla, {story.STORY_SIZE} images a "
          f"story ({anchors} anchors or references), {story.SAMPLER} {story.STEPS} steps, cfg {story.CFG}. "
          f"Total {time.time() - started:.0f} s.")
    header = ("setting", "consistency vs vanilla", "improved", "vs generated", "closer", "same subject",
              "background pull", "pulled", "reference error")
    table = [header]
    summary = {}
    for name, per_seed in rows.items():
        entry = {key: mean_sd([row[key] for row in per_seed]) for key in per_seed[0] if isinstance(per_seed[0][key],
                                                                                                   float)}
        entry["improved"] = sum(row["ratio"] < 1 for row in per_seed)
        entry["pulled"] = sum(row["pull"] > 0 for row in per_seed)
        entry["closer"] = sum(row["vs_generated"] < 1 for row in per_seed if not math.isnan(row["vs_generated"]))
        summary[name] = entry
        generated = not math.isnan(entry["vs_generated"][0])
        table.append((name, _cell(entry["ratio"]), f"{entry['improved']}/{len(per_seed)}",
                      _cell(entry["vs_generated"]) if generated else "-",
                      f"{entry['closer']}/{len(per_seed)}" if generated else "-", _cell(entry["identity"]),
                      _cell(entry["pull"]), f"{entry['pulled']}/{len(per_seed)}",
                      f"{max(row['reference_error'] for row in per_seed):.1e}" if generated else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    print("\n".join(lines))
    print("vanilla's targets-to-references appearance distance: "
          + _cell(mean_sd([row["vanilla_distance"] for row in rows["references, no spectra"]]), 3))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference_quality.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    labels = ["vanilla (refs shown)"] + [f"{kind}, {spectra}" for spectra in spectra_choices
                                         for kind in ("generated", "references")]
    grid_image(pictures, labels).save(args.out / "samples_seed0.png")
    print(f"wrote {args.out / 'reference_quality.json'} and {args.out / 'samples_seed0.png'}")


def _setting(nodes: list):
    from bench.quality import Setting

    return Setting("reference bench", nodes)


def _paired(metrics: dict, vanilla: dict, generated: dict | None, error: float) -> dict:
    distance, base = metrics["consistency_distance"], vanilla["consistency_distance"]
    return {
        "ratio": distance / base if base > 0 else math.nan,
        "vs_generated": (distance / generated["consistency_distance"]
                         if generated is not None and generated["consistency_distance"] > 0 else math.nan),
        "identity": metrics["identity_match"],
        "pull": 1.0 - metrics["background_distance"] / vanilla["background_distance"],
        "vanilla_distance": base,
        "reference_error": error,
    }


def _cell(pair: tuple[float, float], digits: int = 2) -> str:
    mean, sd = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} +- {sd:.{digits}f}"


if __name__ == "__main__":
    main()
