"""Independent, deliberately naive implementations of shared/METHOD.md, for tests to compare against.

One image at a time, one chunk at a time, straight from the definitions; no batching tricks.
"""

from __future__ import annotations

import torch


def reference_shared_attention(q, k, v, cond_or_uncond, anchor_count, attend, key_filter=None, value_filter=None):
    """METHOD.md section 1: image i attends to [K_i ; K_a for every anchor a != i] within its own chunk."""
    chunks = len(cond_or_uncond)
    per_chunk = q.shape[0] // chunks
    anchors = min(anchor_count, per_chunk)
    outputs = []
    for chunk in range(chunks):
        rows = range(chunk * per_chunk, (chunk + 1) * per_chunk)
        k_rows = [k[r:r + 1] for r in rows]
        v_rows = [v[r:r + 1] for r in rows]
        for i, row in enumerate(rows):
            keys, values = [k_rows[i]], [v_rows[i]]
            for a in range(anchors):
                if a != i:
                    keys.append(key_filter(k_rows[a]) if key_filter else k_rows[a])
                    values.append(value_filter(v_rows[a]) if value_filter else v_rows[a])
            outputs.append(attend(q[row:row + 1], torch.cat(keys, dim=1), torch.cat(values, dim=1)))
    return torch.cat(outputs)
