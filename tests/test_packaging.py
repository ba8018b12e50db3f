"""cuda_ops/ and zoo/ are found at run time from the editable install and from an installed wheel."""

from __future__ import annotations

import importlib.resources
import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

RESOLVE = """
import importlib.resources, json, mamba2d
print(json.dumps({
    "module": mamba2d.__file__,
    "cuda_ops": sorted(p.name for p in importlib.resources.files("mamba2d._cuda_ops").iterdir()),
    "zoo": sorted(p.name for p in importlib.resources.files("mamba2d._zoo").iterdir()),
}))
"""


def _expected_files():
    cuda = sorted(p.name for p in (REPO_ROOT / "cuda_ops").iterdir() if p.suffix in (".cu", ".cuh"))
    zoo = sorted(p.name for p in (REPO_ROOT / "zoo").iterdir() if p.suffix in (".yaml", ".safetensors"))
    return cuda, zoo


def test_resources_resolve_from_the_source_install():
    cuda, zoo = _expected_files()
    assert cuda, "cuda_ops/ holds no kernel sources"
    found = {p.name for p in importlib.resources.files("mamba2d._cuda_ops").iterdir()}
    assert set(cuda) <= found
    assert set(zoo) <= {p.name for p in importlib.resources.files("mamba2d._zoo").iterdir()}


@pytest.mark.slow
def test_wheel_ships_cuda_sources_and_zoo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(REPO_ROOT)],
        check=True,
    )
    wheel = next(dist.glob("mamba2d-*.whl"))
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The fresh venv borrows torch & co. from this environment through a plain path entry; the .pth files of
    # this environment (its editable mamba2d among them) are not processed from such an entry.
    fresh_site = Path(subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                              text=True).strip())
    (fresh_site / "borrowed_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    out = subprocess.check_output([str(python), "-c", RESOLVE], text=True, cwd=tmp_path)
    resolved = json.loads(out.strip().splitlines()[-1])
    assert Path(resolved["module"]).is_relative_to(venv), resolved["module"]
    cuda, zoo = _expected_files()
    assert set(cuda) <= set(resolved["cuda_ops"]) and set(zoo) <= set(resolved["zoo"]), resolved


def test_resources_fall_back_to_the_checkout_without_an_install():
    """Running from src/ with no install (PYTHONPATH=src) has no mamba2d._zoo package: the repository folders serve."""
    from mamba2d.resources import resource_dir

    repo = Path(__file__).resolve().parents[1]
    assert resource_dir("mamba2d._not_installed", "zoo", "manifest.yaml") == repo / "zoo"
    assert resource_dir("mamba2d._not_installed", "cuda_ops", "scan2d_band.cu") == repo / "cuda_ops"
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        resource_dir("mamba2d._not_installed", "zoo", "no_such_file.txt")
