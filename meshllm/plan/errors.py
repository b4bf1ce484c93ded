"""The planner's error type (a :class:`~meshllm.errors.MeshError`, so the CLI prints it as one line)."""

from __future__ import annotations

from meshllm.errors import MeshError


class PlanError(MeshError):
    """Planner input is invalid (device file, workload spec, model costs) or no plan can serve the model."""
