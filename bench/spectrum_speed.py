"""Speed of the spectral filter at SDXL shapes: our filtering vs the naive way, and its share
of one extended-attention layer.

    .venv/bin/python bench/spectrum_speed.py

Per layer-step, one cond chunk of B images whose first A are anchors:
- ours: every anchor's K and V filtered once, for everyone who sees them, in one batched call per route
  (the certified iterative top-k solver for truncation chains that keep few values, the Gram eigenproblem
  otherwise). The first line is a call outside sampling (or a run's first step): the iteration starts from
  scratch and stops at its first certified stage. "after step 1" is a call inside sampling from the second step
  on, which reads nothing on the host: the iteration starts from the previous step's basis and the full route's
  rebuild takes the previous step's width (here the previous step is the same matrices plus a 1 % perturbation);
- naive: for every query image, a full float32 thin SVD (torch.linalg.svd) of each anchor it
  sees, then U diag(s') V^T: A * (B - 1) SVDs for K and as many for V.
Ours and naive are timed alternately, repeat by repeat, so machine noise hits both alike; the
figures are medians of one run's repeats. Runs in about three minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Import the pack's attention/ without its ComfyUI entry point (same trick as tests/unit).
PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
if "spectral_anchors" not in sys.modules:
    package = types.ModuleType("spectral_anchors")
    package.__path__ = [str(PACK_ROOT)]
    sys.modules["spectral_anchors"] = package

from spectral_anchors.attention.spectrum import (  # noqa: E402
    Reweight,
    SolverState,
    Spectrum,
    Truncate,
    apply_chain_values,
    filter_groups,
)

IMAGES = 4
ANCHORS = 2
REPEATS = 5
SHAPES = ((4096, 640, 10), (1024, 1280, 20))  # (tokens, channels, heads) of SDXL at 1024x1024
CHAINS = (
    Spectrum((Truncate("quantile", 0.05),)),
    Spectrum((Reweight("log_squared"), Truncate("energy", 0.95))),
    # The opt-in approximation, for comparison (its naive baseline is still the exact SVD).
    Spectrum((Truncate("quantile", 0.05),), method="lowrank"),
)


def realistic_batch(tokens: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """[IMAGES, tokens, channels]: a strong low-rank part plus a noise floor, so singular values
    span several decades like real projected keys and values."""
    rank = 64
    left = torch.randn(IMAGES, tokens, rank, generator=generator)
    right = torch.randn(IMAGES, rank, channels, generator=generator)
    decay = torch.logspace(0, -2, rank).view(1, 1, rank)
    noise = torch.randn(IMAGES, tokens, channels, generator=generator)
    return (left * decay) @ right + 0.05 * noise


def ours(spectrum: Spectrum, keys: torch.Tensor, values: torch.Tensor,
         state: SolverState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched call for all anchors' K and V, as the attention patch makes it."""
    filtered = filter_groups([(spectrum, keys[:ANCHORS]), (spectrum, values[:ANCHORS])], state=state, slot="layer")
    if state is not None and state.settle():
        # Inside sampling the attention patch would redo the model call on the full decomposition: say so.
        print("    (a solve was not exact: sampling would redo this layer's call)")
    return filtered[0], filtered[1]


def warm_state(spectrum: Spectrum, keys: torch.Tensor, values: torch.Tensor, generator: torch.Generator) -> SolverState:
    """A solver state holding the bases of a 'previous step': the same anchors' K and V perturbed by 1 %."""
    state = SolverState()
    previous_keys = keys + 0.01 * keys.std() * torch.randn(keys.shape, generator=generator)
    previous_values = values + 0.01 * values.std() * torch.randn(values.shape, generator=generator)
    ours(spectrum, previous_keys, previous_values, state)
    return state


def naive_filter(spectrum: Spectrum, matrices: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    kept = apply_chain_values(s.double(), spectrum.steps).to(s.dtype)
    return (u * kept.unsqueeze(-2)) @ vh


def naive(spectrum: Spectrum, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What a per-query implementation does: every image filters the anchors it sees, itself."""
    results = []
    for image in range(IMAGES):
        seen = [anchor for anchor in range(ANCHORS) if anchor != image]
        results.append((naive_filter(spectrum, keys[seen]), naive_filter(spectrum, values[seen])))
    return results


def extended_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    shared_keys: torch.Tensor, shared_values: torch.Tensor, heads: int,
) -> torch.Tensor:
    """Targets attend to [own; all anchors], anchors to [own; other anchors]."""
    outputs = []
    for image in range(IMAGES):
        others = [anchor for anchor in range(ANCHORS) if anchor != image]
        k = torch.cat([keys[image : image + 1], *[shared_keys[a : a + 1] for a in others]], dim=1)
        v = torch.cat([values[image : image + 1], *[shared_values[a : a + 1] for a in others]], dim=1)
        outputs.append(sdpa_heads(queries[image : image + 1], k, v, heads))
    return torch.cat(outputs)


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def exact_reference(spectrum: Spectrum, matrices: torch.Tensor) -> torch.Tensor:
    """The definition on a float64 SVD of the same input."""
    u, s, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    return (u * apply_chain_values(s, spectrum.steps).unsqueeze(-2)) @ vh


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def main() -> None:
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed repeats per figure (median)")
    REPEATS = parser.parse_args().repeats
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load} (1/5/15 min); "
          f"B={IMAGES} images, A={ANCHORS} anchors, float32, median of {REPEATS} repeats")
    print("naive = a full thin SVD per (query image, anchor it sees): "
          f"{ANCHORS * (IMAGES - 1)} SVDs for K + {ANCHORS * (IMAGES - 1)} for V per layer-step\n")
    with torch.inference_mode():
        for tokens, channels, heads in SHAPES:
            keys = realistic_batch(tokens, channels, generator)
            values = realistic_batch(tokens, channels, generator)
            queries = realistic_batch(tokens, channels, generator)

            def layer(keys=keys, values=values, queries=queries, heads=heads) -> torch.Tensor:
                return extended_attention(queries, keys, values, keys, values, heads)

            layer()
            attention_time = statistics.median(timed(layer) for _ in range(REPEATS))
            print(f"T={tokens} C={channels} heads={heads}: extended attention (SDPA) {attention_time * 1e3:.0f} ms")
            for spectrum in CHAINS:
                filtered_keys, _ = ours(spectrum, keys, values)  # warm-up, and for the agreement check
                naive_keys = naive(spectrum, keys, values)[-1][0]  # last image is a target: sees every anchor
                exact_keys = exact_reference(spectrum, keys[:ANCHORS])
                warm = spectrum.method == "exact"
                states = [warm_state(spectrum, keys, values, generator) for _ in range(REPEATS + 1)] if warm else []
                if warm:
                    warm_keys, _ = ours(spectrum, keys, values, states.pop())
                ours_times, warm_times, naive_times = [], [], []
                for repeat in range(REPEATS):
                    ours_times.append(timed(lambda s=spectrum, k=keys, v=values: ours(s, k, v)))
                    if warm:
                        warm_times.append(timed(lambda s=spectrum, k=keys, v=values, st=states[repeat]:
                                                ours(s, k, v, st)))
                    naive_times.append(timed(lambda s=spectrum, k=keys, v=values: naive(s, k, v)))
                ours_time = statistics.median(ours_times)
                naive_time = statistics.median(naive_times)
                share = ours_time / (ours_time + attention_time)
                naive_share = naive_time / (naive_time + attention_time)
                print(f"  {spectrum!r:<32} ours {ours_time * 1e3:7.1f} ms   naive {naive_time * 1e3:7.1f} ms   "
                      f"speed-up {naive_time / ours_time:5.1f}x   "
                      f"share of layer: ours {share:5.1%}, naive {naive_share:5.1%}   "
                      f"vs float64 SVD {relative_error(filtered_keys, exact_keys):.1e} "
                      f"(naive float32 SVD {relative_error(naive_keys, exact_keys):.1e})")
                if warm:
                    warm_time = statistics.median(warm_times)
                    print(f"  {'  after step 1':<32} ours {warm_time * 1e3:7.1f} ms   "
                          f"{'':>19}speed-up {naive_time / warm_time:5.1f}x   "
                          f"share of layer: ours {warm_time / (warm_time + attention_time):5.1%}   "
                          f"{'':>16}vs float64 SVD {relative_error(warm_keys, exact_keys):.1e}")
            print()


if __name__ == "__main__":
    main()
