"""Test-wide settings: secrets that nodes create or join go to a throw-away folder, never to ~/.config."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MESHLLM_HOME", tempfile.mkdtemp(prefix="meshllm-home-"))
