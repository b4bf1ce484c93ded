"""Test-wide settings: secrets that nodes create or join go to a throw-away folder, never to ~/.config."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MESHLLM_HOME", tempfile.mkdtemp(prefix="meshllm-home-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests that run real meshes (node processes, brokers, network namespaces) go to one xdist group, so that they run
# one at a time in one worker while the other worker runs the rest (planner, simulator, runtime, parity): on two
# cores, two meshes at once starved each other's timers (a test waited 30 s for stages to load, 2026-12-04).
_REAL_MESH = ("tests.mesh_harness", "tests.serving_harness", "tools.sim_to_real", "tests.netns")
_uses_mesh: dict[Path, bool] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if path not in _uses_mesh:
            text = path.read_text(encoding="utf-8")
            _uses_mesh[path] = any(m in text for m in _REAL_MESH)
        if _uses_mesh[path]:
            item.add_marker(pytest.mark.xdist_group("real-mesh"))
