"""Safety lints over the package source, and crafted pickles against the public loaders.

* RELIABILITY.md B5 #6 (lint half): no `torch.load` without `weights_only=True`, no `pickle.load(s)`
  / `Unpickler`, no `cPickle` / `_pickle` / `dill` / `cloudpickle`, no `joblib.load`, no
  `pandas.read_pickle`, no `numpy.load` that allows pickles, in training/, export/, serving/,
  clipheads/. An AST scan (comments and docstrings that mention these never count), aliases
  resolved (`import numpy as np`, `from torch import load`).
* DESIGN.md, Flow: imports only point down training -> export -> serving -> the top `clipheads`
  modules (api, cli, predictor, ...). Nothing in training imports clipheads.export or
  clipheads.serving; nothing in export imports clipheads.serving; none of the three imports the
  top modules (also not through the top package's lazy names, `from clipheads import Predictor`).
  Absolute imports, relative ones resolved through pyproject.toml's package-dir mapping, and
  `importlib.import_module("...")` with a literal name.
* B5 #6 (loading half): a pickle whose `__reduce__` creates a marker file, named `.safetensors`
  and `.pt`, through every public entry point that takes a head or checkpoint file: a typed error
  and no marker afterwards.

Each checker is first run on small in-memory snippets it must flag (and clean ones it must not),
so a checker that silently finds nothing fails too.
"""
from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("training", "export", "serving", "clipheads")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - py3.10
    tomllib = pytest.importorskip("tomli")


def package_dirs() -> dict[str, Path]:
    """pyproject.toml's `[tool.setuptools] package-dir`: package -> folder."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {pkg: REPO / folder for pkg, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def module_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every .py under the mapped package folders."""
    dirs = package_dirs()
    assert {p.name for p in dirs.values()} >= set(SCANNED), dirs
    for pkg, root in sorted(dirs.items()):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or ".venv" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([pkg, *parts]), path


# ---- 1. unsafe deserialisation -------------------------------------------------------------
BANNED_MODULES = {"cPickle", "_pickle", "dill", "cloudpickle"}  # any import of these is a finding
BANNED_CALLS = {  # fully qualified callables that unpickle
    "pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load", "pandas.read_pickle",
    "torch.serialization.load",
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from every import in the module (function-local too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(func: ast.AST, aliases: dict[str, str]) -> Optional[str]:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    """(found, value node) for keyword `name`; found=None when a **kwargs could hide it."""
    for kw in call.keywords:
        if kw.arg == name:
            return True, kw.value
    if any(kw.arg is None for kw in call.keywords):
        return None, None
    return False, None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_deserialisation(source: str, filename: str = "<snippet>") -> list[str]:
    """`file:line: why` for every call or import in `source` that can unpickle untrusted data."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def flag(node, why):
        found.append(f"{filename}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    flag(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in BANNED_MODULES:
                flag(node, f"imports from {node.module}")
            for a in node.names:
                if f"{node.module}.{a.name}" in BANNED_CALLS:
                    flag(node, f"imports {node.module}.{a.name}")
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            if name is None:
                continue
            if name in BANNED_CALLS:
                flag(node, f"{name}(...) unpickles")
            elif name.split(".")[0] in BANNED_MODULES:
                flag(node, f"{name}(...) from a pickle-based module")
            elif name == "torch.load":
                has, value = _keyword(node, "weights_only")
                if not (has and _is_const(value, True)):
                    flag(node, "torch.load(...) without weights_only=True")
            elif name == "numpy.load":
                has, value = _keyword(node, "allow_pickle")
                if has is None or (has and not _is_const(value, False)):
                    flag(node, "numpy.load(...) with allow_pickle not False")
    return found


BAD_SNIPPETS = {
    "torch.load plain": "import torch\nx = torch.load(path)\n",
    "torch.load weights_only=False": "import torch\nx = torch.load(path, weights_only=False)\n",
    "torch.load weights_only variable": "import torch\nx = torch.load(path, weights_only=trusted)\n",
    "torch.load **kwargs": "import torch\nx = torch.load(path, **kw)\n",
    "torch.load aliased": "def f(p):\n    import torch as th\n    return th.load(p, map_location='cpu')\n",
    "from torch import load": "from torch import load\nx = load(path)\n",
    "torch.serialization.load": "import torch.serialization\nx = torch.serialization.load(f)\n",
    "pickle.load": "import pickle\nwith open(p, 'rb') as f:\n    x = pickle.load(f)\n",
    "pickle.loads aliased": "import pickle as pk\nx = pk.loads(blob)\n",
    "from pickle import loads": "from pickle import loads\n",
    "pickle.Unpickler": "import pickle\nx = pickle.Unpickler(f).load()\n",
    "cPickle": "import cPickle\n",
    "_pickle": "from _pickle import loads\n",
    "dill": "import dill\nx = dill.loads(b)\n",
    "joblib.load": "import joblib\nm = joblib.load('m.joblib')\n",
    "numpy allow_pickle": "import numpy as np\na = np.load(p, allow_pickle=True)\n",
    "numpy allow_pickle variable": "from numpy import load\na = load(p, allow_pickle=flag)\n",
    "pandas.read_pickle": "import pandas as pd\ndf = pd.read_pickle(p)\n",
}
CLEAN_SNIPPETS = {
    "torch.load weights_only": "import torch\nx = torch.load(path, map_location='cpu', weights_only=True)\n",
    "numpy default": "import numpy as np\na = np.load(p)\nb = np.load(p, allow_pickle=False)\n",
    "pickle.dumps": "import pickle\nb = pickle.dumps({'a': 1})\n",
    "a mention": '"""never torch.load(x) nor pickle.load(f)"""\n# pickle.loads(b)\ns = "torch.load(p)"\n',
    "a method named load": "import json\nx = json.load(f)\ny = store.load(p)\n",
}


@pytest.mark.parametrize("case", sorted(BAD_SNIPPETS))
def test_deserialisation_checker_flags_bad_calls(case):
    found = unsafe_deserialisation(BAD_SNIPPETS[case], "bad.py")
    assert found, f"checker missed: {BAD_SNIPPETS[case]!r}"
    assert all(f.startswith("bad.py:") for f in found)


def test_deserialisation_checker_names_file_and_line():
    src = "import torch\n\n\ndef f(p):\n    return torch.load(p)\n"
    assert unsafe_deserialisation(src, "training/x.py") == ["training/x.py:5: torch.load(...) without weights_only=True"]


@pytest.mark.parametrize("case", sorted(CLEAN_SNIPPETS))
def test_deserialisation_checker_passes_safe_calls(case):
    assert unsafe_deserialisation(CLEAN_SNIPPETS[case]) == []


def test_no_unsafe_deserialisation_in_the_package():
    files = [path for _, path in module_files()]
    assert len(files) > 100, "the scan found too few files; is the package-dir mapping read right?"
    findings, torch_loads = [], 0
    for path in files:
        src = path.read_text()
        rel = str(path.relative_to(REPO))
        findings += unsafe_deserialisation(src, rel)
        tree = ast.parse(src)
        aliases = _aliases(tree)
        torch_loads += sum(isinstance(n, ast.Call) and _qualified(n.func, aliases) == "torch.load" for n in ast.walk(tree))
    assert torch_loads >= 2  # training/pretrain.py and training/backbone_convert.py: the scan did read them
    assert not findings, "unsafe deserialisation (RELIABILITY.md B5 #6):\n" + "\n".join(findings)


# ---- 2. import direction -------------------------------------------------------------------
def _layers() -> dict[str, int]:
    """Package -> its place in the flow; the modules of the top `clipheads` package (api, cli,
    predictor, ...: the entry points that dispatch to every part) come last."""
    top = package_dirs()["clipheads"]
    layers = {"clipheads.training": 0, "clipheads.export": 1, "clipheads.serving": 2}
    layers.update({f"clipheads.{p.stem}": 3 for p in top.glob("*.py") if p.stem != "__init__"})
    assert "clipheads.api" in layers and "clipheads.predictor" in layers, layers
    return layers


LAYERS = _layers()


def _lazy_names() -> dict[str, str]:
    """`from clipheads import Predictor`: the top package's lazy attributes and the module each
    one imports (clipheads/__init__.py `_LAZY`)."""
    import clipheads

    return {f"clipheads.{k}": v.partition(":")[0] for k, v in getattr(clipheads, "_LAZY", {}).items()}


LAZY = _lazy_names()


def _layer(module: str) -> Optional[str]:
    module = LAZY.get(module, module)
    return next((pkg for pkg in LAYERS if module == pkg or module.startswith(pkg + ".")), None)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source` (module `module`), relative imports
    resolved; `from X import n` yields X and X.n (n may be a submodule); importlib.import_module /
    __import__ with a literal name count too."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    out.append((node.lineno, "<relative import beyond the top package>"))
                    continue
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value.split(":")[0]))
    return out


def upward_imports(source: str, module: str, is_package: bool = False, filename: str = "<snippet>") -> list[str]:
    """`file:line: A imports B` where B sits in a later layer of the flow than A."""
    own = _layer(module)
    if own is None:
        return []
    return [f"{filename}:{line}: {module} imports {target}"
            for line, target in imported_modules(source, module, is_package)
            if (t := _layer(target)) is not None and LAYERS[t] > LAYERS[own]
            or target.startswith("<relative")]


UPWARD_SNIPPETS = [  # (module, is_package, source)
    ("clipheads.training.loop", False, "from clipheads.export.fold import fold_heads\n"),
    ("clipheads.training.loop", False, "import clipheads.serving.service\n"),
    ("clipheads.training.loop", False, "def f():\n    from ..export import bundle\n"),
    ("clipheads.training.data.readers.csv", False, "from ....serving import images\n"),
    ("clipheads.training.data.readers.csv", False, "from ....export.bundle import load_bundle\n"),
    ("clipheads.training", True, "from ..serving.images import decode_image\n"),
    ("clipheads.training.cli", False, "from clipheads import export\n"),
    ("clipheads.training.cli", False, "from .. import serving\n"),
    ("clipheads.training.cli", False, "import importlib\nm = importlib.import_module('clipheads.export.cli')\n"),
    ("clipheads.export.pipeline", False, "from ..serving.runtimes import open_runtime\n"),
    ("clipheads.export.pipeline", False, "from clipheads.serving import metrics\n"),
    ("clipheads.serving.service", False, "from clipheads.predictor import Predictor\n"),
    ("clipheads.training.fit", False, "from clipheads import Predictor\n"),  # lazy: clipheads.predictor
    ("clipheads.export.heads", False, "from ..api import export_bundle\n"),
]
DOWNWARD_SNIPPETS = [
    ("clipheads.export.pipeline", False, "from clipheads.training.backbone import PreprocessSpec\nfrom . import bundle\n"),
    ("clipheads.export.pipeline", False, "from ..training.artifact import load_head\n"),
    ("clipheads.serving.service", False, "from ..export.bundle import load_bundle\nfrom ..training import fit\n"),
    ("clipheads.training.data.readers.csv", False, "from ..sources import x\nfrom ...files import apply_umask\n"),
    ("clipheads.training", True, "from .methods import list_methods\n"),
    ("clipheads.training", True, "from clipheads import __version__\n"),
    ("clipheads.serving.cli", False, "from clipheads import load_head\n"),  # lazy: clipheads.training.fit
    ("clipheads.api", False, "from clipheads.serving import cli\nfrom .export import pipeline\n"),
]


@pytest.mark.parametrize("module,is_package,source", UPWARD_SNIPPETS)
def test_import_checker_flags_upward_imports(module, is_package, source):
    assert upward_imports(source, module, is_package, "bad.py"), (module, source)


@pytest.mark.parametrize("module,is_package,source", DOWNWARD_SNIPPETS)
def test_import_checker_passes_downward_imports(module, is_package, source):
    assert upward_imports(source, module, is_package) == []


def test_imports_only_point_down_the_flow():
    findings, checked = [], {pkg: 0 for pkg in LAYERS if LAYERS[pkg] < 3}
    for module, path in module_files():
        layer = _layer(module)
        if layer is None:
            continue
        checked[layer] = checked.get(layer, 0) + 1
        findings += upward_imports(path.read_text(), module, path.name == "__init__.py",
                                   str(path.relative_to(REPO)))
    assert all(checked[pkg] >= 5 for pkg in ("clipheads.training", "clipheads.export", "clipheads.serving")), checked
    assert not findings, "imports against the flow training -> export -> serving (DESIGN.md):\n" + "\n".join(findings)


# ---- 3. crafted pickles through the public loaders ------------------------------------------
class _Payload:
    """Unpickling this runs `exec`, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(params=["pickle", "torch-zip"])
def crafted(request, tmp_path):
    """(files by suffix, marker): the same payload as a bare pickle stream or a torch.save zip,
    under a `.safetensors` and a `.pt` name. The payload is shown to be live first."""
    import torch

    marker = tmp_path / "PWNED"
    files = {}
    for suffix in (".head.safetensors", ".pt"):
        path = tmp_path / f"evil{suffix}"
        if request.param == "pickle":
            path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
        else:
            torch.save(_Payload(marker), str(path))
        files[suffix] = path
    # control: an unsafe load of the same bytes does run the payload
    if request.param == "pickle":
        pickle.loads(files[".pt"].read_bytes())
    else:
        torch.load(str(files[".pt"]), weights_only=False)
    assert marker.exists(), "the crafted payload is not live; the test would prove nothing"
    marker.unlink()
    return files, marker


def _loaders():
    """name -> (call(path, tmp_path), the error type it must raise)."""
    from safetensors import SafetensorError

    import clipheads
    from clipheads.training import backbone_convert, pretrain
    from clipheads.training.artifact import ArtifactError
    from clipheads.training.backbone import BackboneError
    from clipheads.training.head_header import read_head_header

    unreadable = (pickle.UnpicklingError, SafetensorError)
    loaders = {
        "clipheads.read_head": (lambda p, t: clipheads.read_head(p), ArtifactError),
        "clipheads.load_head": (lambda p, t: clipheads.load_head(p, device="cpu"), ArtifactError),
        "training.head_header.read_head_header": (lambda p, t: read_head_header(p), ArtifactError),
        "clipheads.load_backbone": (lambda p, t: clipheads.load_backbone("test-vit-micro", str(p)), BackboneError),
        "training.backbone_convert.convert_checkpoint": (
            lambda p, t: backbone_convert.convert_checkpoint(p, t / "out.safetensors", arch="test-vit-micro",
                                                             act="gelu"), BackboneError),
        # open_clip's loader / torch.load itself (torch routes a *.safetensors path to safetensors)
        "training.pretrain.load_tiny": (lambda p, t: pretrain.load_tiny(p), unreadable),
        "training.pretrain.load_pool": (lambda p, t: pretrain.load_pool([], p, "pool"), unreadable),
    }
    try:
        from clipheads.export.heads import export_bundle
        from clipheads.export.pipeline import ExportOptions

        loaders["export.heads.export_bundle"] = (
            lambda p, t: export_bundle([str(p)], None, ExportOptions(probes=4)), ArtifactError)
    except ImportError:  # onnx extras missing
        pass
    try:
        from clipheads.serving.encoder.heads import HeadLoadError, load_head as serve_load_head
        from clipheads.serving.runtimes.base import RuntimeError_
        from clipheads.serving.runtimes.select import open_runtime

        loaders["serving.runtimes.open_runtime"] = (lambda p, t: open_runtime(p, "torch", device="cpu"),
                                                    RuntimeError_)
        loaders["serving.encoder.heads.load_head"] = (lambda p, t: serve_load_head(p, "torch", warm=False),
                                                      HeadLoadError)
    except ImportError:  # serving extras missing
        pass
    return loaders


LOADERS = ["clipheads.read_head", "clipheads.load_head", "training.head_header.read_head_header",
           "clipheads.load_backbone", "training.backbone_convert.convert_checkpoint", "training.pretrain.load_tiny",
           "training.pretrain.load_pool", "export.heads.export_bundle", "serving.runtimes.open_runtime",
           "serving.encoder.heads.load_head"]


@pytest.mark.parametrize("loader", LOADERS)
def test_crafted_pickle_is_refused_and_never_runs(loader, crafted, tmp_path, micro_backbone):
    files, marker = crafted
    loaders = _loaders()
    if loader not in loaders:
        pytest.skip(f"{loader}: its optional dependencies are not installed")
    call, error = loaders[loader]
    for suffix, path in files.items():
        with pytest.raises(error) as info:
            call(path, tmp_path)
        assert not marker.exists(), f"{loader} ran the payload of {path.name}"
        assert str(info.value).strip(), f"{loader}: an empty error for {path.name}"
    assert not marker.exists()
