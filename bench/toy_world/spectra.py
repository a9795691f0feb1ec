"""How concentrated the toy model's self-attention K / V spectra are (does truncation have a tail to cut?).

    OMP_NUM_THREADS=1 .venv/bin/python bench/toy_world/spectra.py [--seeds 4]

Samples vanilla stories, records each anchor's K and V [N, C] at every self-attention layer and step (cond chunk),
and prints, per layer, the share of the energy (sum of s^2) held by the top 5 % / 25 % of singular values and the
number of values that 90 % / 99 % of the energy needs. A world whose top 25 % hold ~99 % gives truncation nothing
to do; fine, high-rank background detail should leave a visible tail.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch


def energy_stats(matrix: torch.Tensor) -> dict[str, float]:
    s = torch.linalg.svdvals(matrix.double())
    energy = s ** 2 / (s ** 2).sum()
    cumulative = energy.cumsum(0)
    rank = len(s)

    def top(fraction: float) -> float:
        return float(cumulative[max(1, math.ceil(fraction * rank)) - 1])

    def needed(level: float) -> int:
        return int((cumulative < level - 1e-9).sum()) + 1

    return {"rank": rank, "top5": top(0.05), "top25": top(0.25), "k90": needed(0.90), "k99": needed(0.99)}


def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "tests"))
    sys.path.insert(0, str(repo))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from comfy_harness import boot_comfy

    boot_comfy()
    import comfy.ldm.modules.attention as comfy_attention

    from bench.toy_world import model as toy_model
    from bench.toy_world import story

    model, vocab, config, _ = toy_model.load(args.weights or toy_model.WEIGHTS_PATH)
    records: dict[tuple, list[dict]] = defaultdict(list)

    def make_recorder(layer):
        def recorder(q, k, v, extra_options):
            chunks = extra_options["cond_or_uncond"]
            per_chunk = q.shape[0] // len(chunks)
            if 0 in chunks:  # 0 = cond
                offset = chunks.index(0) * per_chunk
                for anchor in range(story.ANCHORS):
                    records[(layer, "K", q.shape[1])].append(energy_stats(k[offset + anchor]))
                    records[(layer, "V", q.shape[1])].append(energy_stats(v[offset + anchor]))
            return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return recorder

    patched = model.clone()
    unet = model.model.diffusion_model
    from comfy.ldm.modules.attention import SpatialTransformer

    stages = [("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)]
    for name, blocks in stages:
        for block_id, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for index in range(len(layer.transformer_blocks)):
                        key = (name, block_id, index)
                        patched.set_model_attn1_replace(make_recorder(key), *key)
    for seed in range(args.seeds):
        story.sample_story(patched, vocab, config.size, seed)
    print(f"{'layer':18s} {'':2s} {'tokens':>6s} {'rank':>4s} {'top5%':>7s} {'top25%':>7s} {'k90':>5s} {'k99':>5s}")
    for (layer, which, tokens), rows in sorted(records.items()):
        mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
        print(f"{str(layer):18s} {which:2s} {tokens:6d} {mean['rank']:4.0f} {mean['top5']:7.3f} {mean['top25']:7.3f} "
              f"{mean['k90']:5.1f} {mean['k99']:5.1f}")


if __name__ == "__main__":
    main()
