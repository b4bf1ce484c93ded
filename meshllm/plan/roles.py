"""The role rule: which replicas run prompts (PREFILL) and which make tokens (DECODE).

Our reconstruction (the E2LLM abstract says only that roles follow each
replica's "efficiency in handling input and output tokens"): every replica has
a prefill capacity ``a_r`` (prompts/s of the workload's mean prompt) and a
decode capacity ``d_r`` (requests/s whose output tokens it can make with all
its slots busy). Replicas are ranked by ``a_r / d_r``, most prefill-efficient
first; the first ``p`` become PREFILL, the rest DECODE. The ``p`` that makes
the two pools' capacities match best (maximises ``min(sum a, sum d)``, the
sustainable rate) is the candidate, and its neighbours ``p - 1`` and ``p + 1``
are scored too; the caller keeps the best of these on the full objective.
Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def efficiency_order(prefill_rates: Sequence[float], decode_rates: Sequence[float]) -> list[int]:
    """Replica indices, the most prefill-efficient (highest prefill/decode capacity ratio) first."""
    a = np.asarray(prefill_rates, dtype=float)
    d = np.asarray(decode_rates, dtype=float)
    ratio = a / np.maximum(d, 1e-300)
    return [int(i) for i in np.lexsort((np.arange(len(a)), -ratio))]


def split_candidates(prefill_rates: Sequence[float], decode_rates: Sequence[float]) -> list[int]:
    """Numbers of PREFILL replicas to try (1..R-1), for rates already in efficiency order."""
    r = len(prefill_rates)
    if r < 2:
        return []
    a = np.cumsum(prefill_rates)[:-1]  # prefill capacity with p = 1..R-1
    d = np.cumsum(np.asarray(decode_rates)[::-1])[::-1][1:]  # decode capacity of the rest
    best = int(np.argmax(np.minimum(a, d))) + 1
    out: list[int] = []
    for p in (best, best - 1, best + 1, 1, r - 1):
        if 1 <= p <= r - 1 and p not in out:
            out.append(p)
    return out
