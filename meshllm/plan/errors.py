"""The planner's error type, kept importable from here; it lives in :mod:`meshllm.errors`."""

from __future__ import annotations

from meshllm.errors import PlanError

__all__ = ["PlanError"]
