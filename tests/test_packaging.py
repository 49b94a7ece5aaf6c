"""One installed namespace: the wheel holds `clipheads.{training,export,serving}` and nothing else.

A user's project with its own `training/` folder (the decoy) must not shadow ours, from a built
wheel and from the editable install CI uses.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"clipheads": "clipheads", "training": "clipheads.training", "export": "clipheads.export",
         "serving": "clipheads.serving"}

PROBE = (
    "import sys, clipheads, clipheads.training.backbone, clipheads.export.bundle, clipheads.serving.images\n"
    "assert 'training' not in sys.modules, 'the decoy was imported'\n"
    "print(clipheads.training.backbone.__file__)\n"
)


def _decoy(tmp_path: Path) -> Path:
    """A user's project folder whose own `training`/`serving`/`export` packages blow up on import."""
    project = tmp_path / "user_project"
    for name in ("training", "serving", "export"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('decoy {name} imported')\n")
    return project


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in PARTS.items()}
    found = set()
    for folder, package in PARTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    assert found == declared, f"pyproject packages out of date: missing {found - declared}, extra {declared - found}"


def test_editable_install_ignores_a_decoy_training_package(tmp_path):
    project = _decoy(tmp_path)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(ROOT / "training")
    cli = subprocess.run([sys.executable, "-m", "clipheads", "--version"], cwd=project, capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.startswith("clipheads "), cli.stderr


@pytest.mark.slow
def test_wheel_has_one_namespace_and_beats_a_decoy(tmp_path, clipheads_wheel):
    wheel = clipheads_wheel  # `pip wheel` of this repository (conftest; the Bento test reuses it)
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"clipheads"}, top
    for data in ("clipheads/training/model_configs/clipheads-tiny.json",
                 "clipheads/training/weights/clipheads-tiny.safetensors", "clipheads/export/BUNDLE.md"):
        assert data in names, data
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    project = _decoy(tmp_path)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(site), out.stdout
    # the installed copy finds its packaged tiny CLIP without the repository
    code = ("from clipheads.training.backbone import load_backbone; b = load_backbone(); "
            "print(type(b).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
