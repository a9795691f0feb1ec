"""attention/sharing.shared_attention against the naive per-image reference of METHOD.md section 1 (tests/reference.py),
on the CPU: two chunks, several targets, filters on the anchors' keys and values, and subject-mask token selection."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference_shared_attention, reference_spectrum_filter

from spectral_anchors.attention.sharing import shared_attention
from spectral_anchors.attention.spectrum import Reweight, Spectrum, Truncate, filter_groups


def attend(q, k, v, heads=2):
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    scores = split(q) @ split(k).mT / math.sqrt(q.shape[-1] // heads)
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)


def inputs(chunks=2, images=5, tokens=12, channels=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(chunks * images, tokens, channels, generator=generator, dtype=torch.float64) * 2
                 for _ in range(3))


KEY_STEPS = [("truncate", "quantile", 0.25)]
VALUE_STEPS = [("reweight", "log_squared", 1.0), ("truncate", "energy", 0.9)]
KEY_SPECTRUM = Spectrum((Truncate("quantile", 0.25),))
VALUE_SPECTRUM = Spectrum((Reweight("log_squared"), Truncate("energy", 0.9)))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("paired", [False, True])
def test_shared_attention_matches_the_reference(masked, paired):
    q, k, v = inputs()
    keep = [torch.tensor([0, 2, 3, 7, 11]), torch.tensor([1, 4, 5, 6, 8, 9, 10])] if masked else None
    if paired:
        def pair(keys, values):
            return tuple(filter_groups([(KEY_SPECTRUM, keys), (VALUE_SPECTRUM, values)]))
        ours = shared_attention(q, k, v, 2, 2, attend, anchor_keep=keep, pair_filter=pair)
    else:
        ours = shared_attention(q, k, v, 2, 2, attend, key_filter=KEY_SPECTRUM, value_filter=VALUE_SPECTRUM,
                                anchor_keep=keep)
    reference = reference_shared_attention(q, k, v, [1, 0], 2, attend, reference_spectrum_filter(KEY_STEPS),
                                           reference_spectrum_filter(VALUE_STEPS), anchor_keep=keep)
    unfiltered = shared_attention(q, k, v, 2, 2, attend, anchor_keep=keep)
    assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-9)
    # The filters matter here, so matching the reference is not matching unfiltered sharing.
    assert (ours - unfiltered).abs().max() > 1e6 * (ours - reference).abs().max()


def test_an_anchors_own_keys_are_never_filtered_and_targets_never_see_each_other():
    q, k, v = inputs(images=4)
    ours = shared_attention(q, k, v, 2, 2, attend, key_filter=KEY_SPECTRUM)
    # Anchor 0 of chunk 0 attends to [own K unfiltered ; anchor 1's filtered K]:
    own_then_other = torch.cat([k[0:1], KEY_SPECTRUM(k[1:2])], dim=1)
    expected = attend(q[0:1], own_then_other, torch.cat([v[0:1], v[1:2]], dim=1))
    assert torch.allclose(ours[0:1], expected, rtol=1e-12, atol=1e-12)
    # Changing target 3 leaves target 2 (and the anchors) unchanged.
    k2 = k.clone()
    k2[3] += 1.0
    other = shared_attention(q, k2, v, 2, 2, attend, key_filter=KEY_SPECTRUM)
    assert torch.equal(other[:3], ours[:3]) and torch.equal(other[4:], ours[4:])
