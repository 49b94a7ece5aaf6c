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


# B5 #23: what a Bento or a `pip install clipheads[serve]` gets, not only this venv, is at or above
# the CVE floors (bentoml alone would admit starlette 0.24, below the multipart-DoS fix in 0.40)
REPO = Path(__file__).resolve().parents[1]
SERVE_FLOORS = {"starlette": "0.40", "h11": "0.16", "python-multipart": "0.0.18", "bentoml": "1.4.39",
                "pillow": "12.3", "torch": "2.6"}


def _pins(lines) -> dict:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        for op in ("==", ">="):
            if op in line:
                name, ver = line.split(op, 1)
                out[name.strip().lower()] = ver.split(",")[0].strip().strip('"')
    return out


@pytest.mark.parametrize("where", ["bentofile.yaml", "requirements", "pyproject serve extra"])
def test_cve_floors_are_pinned_where_installs_come_from(where):
    from packaging.version import Version

    if where == "bentofile.yaml":
        pins = _pins((REPO / "bentofile.yaml").read_text().splitlines())
    elif where == "requirements":
        pins = _pins(line for f in (REPO / "requirements").glob("*.txt") for line in f.read_text().splitlines())
    else:
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        pins = _pins(project["dependencies"] + project["optional-dependencies"]["serve"])
    for dist, floor in SERVE_FLOORS.items():
        assert dist in pins, f"{where}: {dist} is not pinned (floor {floor})"
        assert Version(pins[dist]) >= Version(floor), f"{where}: {dist} {pins[dist]} is below {floor}"
