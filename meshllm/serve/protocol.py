"""Serving frames on the data plane, and their validation. Pure: no I/O.

Every frame names the plan version (``pv``) and replica (``r``) it belongs to,
so that a node holding an old and a new plan's stage during a roll-out sends
each frame to the right one.

==========  ==================================================  =======================
type        fields                                              goes to
==========  ==================================================  =======================
prefill     pv r id x meta                                      next stage of a replica
step        pv r ids x                                          next stage (a batch)
kv          pv r id layer k vv                                  DECODE stage holding layer
                (k, vv in the sender's KV dtype: float32 or float16)
begin       pv r id token sampler meta                          DECODE replica's last stage
release     pv r id                                             every stage of a replica
cancel      id                                                  the request's last stage
done        id pr dr finish                                     the scheduler
bounce      id why                                              the scheduler: a prompt or begin
                                                                reached a node without that stage
==========  ==================================================  =======================

``x`` is token ids (int64) for a replica's first stage and hidden states
(float32, ``(B, S, dim)``) for the others. ``meta`` is the request's
metadata (reply topic, sampling, prompt length, timings), read only by the
stage that samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.dataplane.codec import FrameError
from meshllm.errors import GenerationError
from meshllm.runtime.sampling import SamplingParams

_SPEC: dict[str, dict[str, type | tuple[type, ...]]] = {
    "prefill": {"pv": int, "r": int, "id": str, "x": np.ndarray, "meta": dict},
    "step": {"pv": int, "r": int, "ids": list, "x": np.ndarray},
    "kv": {"pv": int, "r": int, "id": str, "layer": int, "k": np.ndarray, "vv": np.ndarray},
    "begin": {"pv": int, "r": int, "id": str, "token": int, "sampler": (str, type(None)), "meta": dict},
    "release": {"pv": int, "r": int, "id": str},
    "cancel": {"id": str},
    "done": {"id": str, "pr": int, "dr": int, "finish": str},
    "bounce": {"id": str, "why": str},
}
MAX_BATCH_IDS = 1024
KV_WIRE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))  # a KV block travels in its cache's dtype


def check(frame: dict[str, Any]) -> dict[str, Any]:
    """Validates a serving frame's fields and types; raises FrameError naming the problem."""
    t = frame.get("t")
    spec = _SPEC.get(t)  # type: ignore[arg-type]
    if spec is None:
        raise FrameError(f"unknown serving frame type {t!r}")
    for name, kind in spec.items():
        v = frame.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise FrameError(f"{t} frame: field {name!r} must be {kind}, got {type(v).__name__}")
    if t == "step":
        ids = frame["ids"]
        if not ids or len(ids) > MAX_BATCH_IDS or not all(isinstance(i, str) for i in ids):
            raise FrameError("step frame: 'ids' must be 1..1024 request ids")
        if frame["x"].shape[0] != len(ids):
            raise FrameError(f"step frame: x has batch {frame['x'].shape[0]} for {len(ids)} ids")
    if t in ("prefill", "step") and frame["x"].dtype not in (np.int64, np.float32):
        raise FrameError(f"{t} frame: x must be int64 ids or float32 hidden states, got {frame['x'].dtype}")
    if t in ("prefill", "begin"):
        _check_meta(t, frame["meta"])
    if t == "kv":
        k, v = frame["k"], frame["vv"]
        if k.shape != v.shape or k.ndim != 3 or k.dtype != v.dtype or k.dtype not in KV_WIRE_DTYPES:
            raise FrameError("kv frame: k and vv must be float32 or float16 arrays of one dtype and one shape "
                             "(kv_heads, n, head_dim)")
    return frame


# What every stage may read in a request's ``meta`` (more keys are timings and bookkeeping).
_META: dict[str, type | tuple[type, ...]] = {"reply_to": str, "sampling": dict, "prompt_len": int,
                                             "last_prompt_token": int, "prefill_r": int, "decode_r": int}


def _check_meta(t: str, meta: dict[str, Any]) -> None:
    for name, kind in _META.items():
        v = meta.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise FrameError(f"{t} frame: meta.{name} must be {kind}, got {type(v).__name__}")
    try:
        SamplingParams(**{**meta["sampling"], "stop": tuple(meta["sampling"].get("stop") or ())})
    except (TypeError, GenerationError) as e:
        raise FrameError(f"{t} frame: meta.sampling: {e}") from None
    resume = meta.get("resume")
    if resume is not None and (not isinstance(resume, dict) or not isinstance(resume.get("tokens"), list)
                               or not all(isinstance(i, int) and not isinstance(i, bool) for i in resume["tokens"])):
        raise FrameError(f"{t} frame: meta.resume must hold a list of token ids")
