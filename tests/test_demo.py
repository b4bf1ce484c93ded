"""`meshllm demo`, the README's main job, as a newcomer gets it: from a wheel installed in a fresh venv, offline.

Builds the wheel (no network: `pip wheel --no-deps --no-build-isolation`), installs it in a new venv that
takes its dependencies from this machine, and runs `meshllm demo` from it three times (a flaky plan or a noisy
exit shows up across runs): twice here, and once as `meshllm demo --serve` in tests/test_demo_serve.py, which
uses the same installed wheel (a session fixture) and checks the same things after Ctrl-C. Each run must plan
>= 2 replicas with a PREFILL and a DECODE role and a pipeline of >= 2 stages, answer every prompt with
readable text, print nothing at WARNING/ERROR and no traceback, and leave no node process behind.
`check_demo_output` is shared with tests/test_demo_serve.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "ERROR", "WARNING")


def mesh_processes(mesh: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"--mesh {mesh} "], capture_output=True, text=True)
    return out.stdout.split()


def check_demo_output(stdout: str, stderr: str, prompts: list[str]) -> str:
    """Asserts what every demo run must show; returns the demo's mesh name."""
    for word in NOISE:
        assert word not in stdout and word not in stderr, f"{word!r} in the demo's output:\n{stdout}\n{stderr}"
    mesh = re.search(r"mesh (demo-[0-9a-f]+)", stdout)
    assert mesh, stdout
    roles = re.findall(r"^  replica (\d+) (PREFILL|DECODE|MIXED) +(.+)$", stdout, re.M)
    assert len(roles) >= 2, stdout
    assert {"PREFILL", "DECODE"} <= {r[1] for r in roles}, stdout
    assert max(len(r[2].split("->")) for r in roles) >= 2, f"no pipeline of two stages or more:\n{stdout}"
    assert "why this plan:" in stdout and "KV hand-off" in stdout, stdout
    for p in prompts:
        answer = re.search(rf"^{re.escape(p)}(.*)$", stdout, re.M)
        assert answer and len(re.findall(r"[A-Za-z]+", answer.group(1))) >= 4, f"no readable answer to {p!r}:\n{stdout}"
    assert stdout.count("tokens/s;") == len(prompts), stdout
    assert "all nodes stopped" in stdout
    return mesh.group(1)


def _tree_copy(dst: Path) -> Path:
    """What a source distribution holds: the package, the model, the build files (never the work tree's build/)."""
    src = dst / "src"
    src.mkdir()
    for name in ("meshllm", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with meshllm installed from its wheel; returns the venv's `meshllm` script."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _tree_copy(tmp)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("meshllm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "meshllm").rglob("*.py")}
    assert modules <= names, f"the wheel lacks {sorted(modules - names)} (pyproject.toml's package list?)"
    model = {f"meshllm/{p.relative_to(ROOT)}" for p in (ROOT / "models").rglob("*") if p.is_file()}
    assert model <= names, f"the wheel lacks the bundled model's {sorted(model - names)[:3]}"
    venv = tmp / "venv"
    # --without-pip: the venv's python runs this machine's pip (a system site package), installing into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    # --ignore-installed: a meshllm already installed on the system (an editable install, maybe of a tree that
    # is gone) must not make pip skip the wheel
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, timeout=300)
    print(f"wheel built and installed in {time.monotonic() - t0:.1f} s")
    return venv / "bin" / "meshllm"


def wheel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, not the tree
    env["HOME"] = os.environ.get("HOME", "/tmp")
    return env


def test_the_installed_package_is_the_wheel_and_holds_the_model(installed: Path) -> None:
    py = installed.parent / "python"
    out = subprocess.run([str(py), "-c", "import meshllm, meshllm.demo as d; print(meshllm.__file__); "
                          "print(d.bundled_model())"], capture_output=True, text=True, env=wheel_env(), cwd="/",
                         timeout=60, check=True).stdout.split()
    venv = str(installed.parent.parent)
    assert out[0].startswith(venv) and out[1].startswith(venv), out


@pytest.mark.parametrize("run", [1, 2])  # the third run from the wheel: tests/test_demo_serve.py
def test_demo_from_the_wheel_shows_roles_and_a_pipeline_and_exits_cleanly(installed: Path, run: int) -> None:
    prompts = ["She was", "Mr. Darcy"]
    args = [str(installed), "demo", "--max-tokens", "16"]
    for p in prompts:
        args += ["--prompt", p]
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=240, env=wheel_env(), cwd="/")
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    mesh = check_demo_output(p.stdout, p.stderr, prompts)
    first = re.search(r"first token ([\d.]+) s after", p.stdout)
    print(f"run {run}: {took:.1f} s, first token {first.group(1) if first else '?'} s after start")
    assert not mesh_processes(mesh), "the demo left node processes behind"
