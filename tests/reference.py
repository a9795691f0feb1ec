"""Independent, deliberately naive implementations of docs/method.md, for tests to compare against.

One image at a time, one chunk at a time, straight from the definitions; no batching tricks.
"""

from __future__ import annotations

import torch


def reference_shared_attention(q, k, v, cond_or_uncond, anchor_count, attend, key_filter=None, value_filter=None,
                               anchor_keep=None):
    """docs/method.md section 1: image i attends to [K_i ; K_a for every anchor a != i] within its own chunk.

    anchor_keep: per anchor, the token indices it contributes to other images (subject masks); its own stay whole.
    """
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
                    shared_k = key_filter(k_rows[a]) if key_filter else k_rows[a]
                    shared_v = value_filter(v_rows[a]) if value_filter else v_rows[a]
                    if anchor_keep is not None:
                        shared_k, shared_v = shared_k[:, anchor_keep[a]], shared_v[:, anchor_keep[a]]
                    keys.append(shared_k)
                    values.append(shared_v)
            outputs.append(attend(q[row:row + 1], torch.cat(keys, dim=1), torch.cat(values, dim=1)))
    return torch.cat(outputs)


def reference_spectrum_filter(steps):
    """docs/method.md section 3 by a float64 SVD of each matrix: steps are (kind, mode, value) tuples.

    kind "truncate": fixed N / quantile q / energy q; kind "reweight": log / log_squared / exp(alpha).
    """
    import math

    def apply(x):
        out = []
        for matrix in x.double():
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            s = s.clone()
            for kind, mode, value in steps:
                r = s.numel()
                if kind == "truncate":
                    if mode == "fixed":
                        keep = min(int(value), r)
                    elif mode == "quantile":
                        keep = max(1, math.ceil(value * r - 1e-9))
                    else:
                        total = float((s ** 2).sum())
                        if total == 0:
                            keep = r
                        else:
                            energy = torch.cumsum(s ** 2, 0) / total
                            keep = int((energy < value - 1e-6).sum()) + 1
                    s[keep:] = 0
                else:
                    norm = float(s.norm())
                    if mode == "log":
                        shaped = torch.clamp(torch.log(torch.clamp(s, min=1e-300)), min=0) * (s > 0)
                    elif mode == "log_squared":
                        shaped = torch.clamp(torch.log(torch.clamp(s, min=1e-300)), min=0) ** 2 * (s > 0)
                    else:
                        shaped = s * torch.exp(value * s / s.max()) if float(s.max()) > 0 else s
                    if float(shaped.norm()) > 0:
                        s = shaped * (norm / float(shaped.norm()))
            out.append((u * s) @ vh)
        return torch.stack(out).to(x.dtype)

    return apply
