"""Issue 15.7: every `clipheads` command follows the same conventions (training/console.py), run as a
user runs them, in subprocesses whose stdout/stderr are pipes (not a terminal):

* a real `clipheads demo` (world -> train -> export -> serve over HTTP) redirected writes no `\\r`
  progress frames; the same progress bar does draw on a pseudo-terminal (so the check can fail);
* `--json` on every command prints one JSON document on stdout (the commands that open BentoML's
  store run as subprocesses, since BentoML fixes its store at import; the others run the same
  `clipheads.cli.main` in-process with stdout/stderr captured at the file descriptors: a
  subprocess per command cost ~6 s of imports each and proved nothing more);
* bad input exits 2 with one `clipheads CMD: error: ...` line and no traceback (with `--json`:
  `{"ok": false, ...}` on stdout);
* `info` prints readable text, and heads record their data as absolute paths.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import tty
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def clipheads(*args, home: Path, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", HF_HUB_OFFLINE="1")
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "clipheads", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def in_process(capfd, *args) -> subprocess.CompletedProcess:
    """The entry point's `main` in this process, its output read at the file descriptors (pipes here,
    not a terminal, as for a redirected subprocess)."""
    from clipheads.cli import main

    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def ok_json(res: subprocess.CompletedProcess):
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A real `clipheads demo --json` (2 shots, 1 epoch, 16 gate images: the test is about output, not
    the gate; served over HTTP), stdout/stderr redirected:
    the steps and any progress go to stderr, the result to stdout."""
    d = tmp_path_factory.mktemp("cli")
    res = clipheads("demo", "--out", d / "demo", "--shots", 2, "--epochs", 1, "--gate-images", 16, "--json", home=d / "bentoml")
    assert res.returncode == 0, res.stderr[-3000:]
    return d, res


def test_redirected_demo_writes_no_carriage_returns(demo):
    _, res = demo
    assert "[7/7] serve the bundle" in res.stderr and "demo finished" in res.stderr
    assert "\r" not in res.stdout and "\r" not in res.stderr
    assert "Traceback" not in res.stderr


def test_progress_bars_draw_on_a_terminal_only(demo, tmp_path):
    """`clipheads score` with stderr on a pseudo-terminal draws its bar (`\\r` frames); the same
    command with stderr redirected writes none."""
    d, _ = demo
    head = next((d / "demo").glob("*.head.safetensors"))
    images = d / "demo" / "world" / "sketch" / "circle"
    cmd = [sys.executable, "-m", "clipheads", "score", str(head), "--input", str(images), "--runtime", "torch",
           "--batch-size", "4"]
    master, slave = pty.openpty()
    tty.setraw(slave)  # no "\n" -> "\r\n" translation: every "\r" seen is the program's
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm hides bars on 0 rows
    try:
        proc = subprocess.Popen([*cmd, "--output", str(tmp_path / "tty.parquet")], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(300) == 0, seen[-2000:]
    finally:
        os.close(master)
    assert b"\r" in seen and b"scoring" in seen
    piped = subprocess.run([*cmd, "--output", str(tmp_path / "pipe.parquet")], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert piped.returncode == 0 and "\r" not in piped.stderr and "scored" in piped.stderr


def test_every_command_takes_json(demo, tmp_path, capfd):
    d, res = demo
    home = d / "bentoml"
    out = d / "demo"
    head = next(out.glob("*.head.safetensors"))
    demo_json = json.loads(res.stdout)  # the demo fixture ran with --json
    assert demo_json["tuned_top1"] and demo_json["held_out_domain"]

    world = ok_json(in_process(capfd, "data", "synth", tmp_path / "w", "--per-class", "2,1,1", "--json"))
    assert (Path(world["out"]) / "world.json").is_file()
    methods = ok_json(in_process(capfd, "methods", "--json"))
    assert {m["method"] for m in methods["methods"]} >= {"coop", "maple", "mma"}
    trained = ok_json(in_process(capfd, "train", "--method", "coop", "--data", tmp_path / "w" / "photo", "--epochs", 1,
                                "--out", tmp_path / "h.head.safetensors", "--test-fraction", 0.5, "--json"))
    assert Path(trained["head"]).is_file()
    evald = ok_json(in_process(capfd, "eval", tmp_path / "h.head.safetensors", "--data", tmp_path / "w" / "photo", "--json"))
    assert evald["split"] == "test"
    info = ok_json(in_process(capfd, "info", head, "--json"))
    assert info["method"] == "coop"
    for spec in info["training"]["data"].values():  # PATH or READER:ROOT[:DOMAIN], the path absolute
        assert any(part.startswith("/") for part in spec.split(":")), spec
    text = in_process(capfd, "info", head)
    assert text.returncode == 0 and "coop" in text.stdout and "{'" not in text.stdout  # readable, not a dict repr

    exported = ok_json(in_process(capfd, "export", head, "--out", tmp_path / "bundle", "--probes", 16, "--json"))
    assert exported["ok"] is True and Path(exported["bundle"]).is_dir()
    scored = ok_json(in_process(capfd, "score", tmp_path / "bundle", "--input", out / "world" / "sketch" / "circle",
                               "--output", tmp_path / "p.parquet", "--json"))
    assert scored["scored"] > 0 and scored["runtime"] == "onnx-cpu"
    saved = ok_json(clipheads("models", "save", head, "--name", "demo-head", "--json", home=home))
    assert saved["tag"].startswith("demo-head:") and saved["warnings"] == []  # the packaged tiny CLIP: nothing to store
    listed = ok_json(clipheads("models", "list", "--json", home=home))
    assert [r["tag"] for r in listed] == [saved["tag"]]
    bf = ok_json(clipheads("models", "bentofile", "demo-head", "--out", tmp_path / "bentofile.yaml", "--json", home=home))
    assert bf["model"] == "demo-head"
    dry = ok_json(clipheads("serve", "demo-head", "--dry-run", "--json", home=home))
    assert dry["command"][:4] == [sys.executable, "-m", "bentoml", "serve"] and dry["env"]["CLIPHEADS_SOURCE"]
    recipes = ok_json(in_process(capfd, "bench", "list", "--json"))
    assert any(r["name"] == "coop_base2novel" for r in recipes["recipes"])
    ckpt = tmp_path / "sd.pt"
    _state_dict_checkpoint(ckpt)
    conv = ok_json(in_process(capfd, "convert", ckpt, "--out", tmp_path / "sd.safetensors", "--arch", "clipheads-tiny",
                             "--act", "gelu", "--json"))
    assert conv["tensors"] > 0
    glob = in_process(capfd, "-q", "--json", "bench", "list")  # global flags before the command
    assert ok_json(glob)["recipes"] and glob.stderr == ""


def _state_dict_checkpoint(path: Path) -> None:
    import torch

    from clipheads.training.backbone import load_backbone

    bb = load_backbone("clipheads-tiny", "clipheads")
    torch.save({k: v.contiguous() for k, v in bb.model.state_dict().items()}, path)


BAD = [  # one case per distinct code path: argparse, each command's own checks
    (["train", "--bogus-flag"], "train"),
    (["train", "--method", "nosuch", "--data", "x", "--out", "x.head.safetensors"], "train"),
    (["eval", "nosuch.head.safetensors", "--data", "x"], "eval"),
    (["info", "nosuch.head.safetensors"], "info"),
    (["data", "synth"], "data synth"),
    (["convert", "nosuch.pt", "--out", "x.safetensors"], "convert"),
    (["export", "nosuch.head.safetensors", "--out", "b"], "export"),
    (["export", "build-engine", "nosuch-bundle"], "export build-engine"),
    (["score", "nosuch-bundle", "--input", ".", "--output", "o.parquet"], "score"),
    (["score", "--top-k"], "score"),
    (["serve", "nosuch-model:v1", "--dry-run"], "serve"),
    (["models", "save", "nosuch.head.safetensors"], "models save"),
    (["models", "bentofile", "nosuch:v1"], "models bentofile"),
    (["bench", "protocol", "coop_base2novel", "--data-root", "nosuch-root", "--out", "r"], "bench protocol"),
    (["bench", "report", "nosuch-runs"], "bench report"),
]


@pytest.mark.parametrize("args,prog", BAD, ids=[" ".join(a[:2]) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, prog, tmp_path, monkeypatch, capfd):
    """The `clipheads` entry point in-process (an escaping exception would fail the test): one
    error line (after any progress lines the command printed first), no traceback, exit 2, and
    under --json a JSON error document on stdout."""
    from clipheads.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*args, "--json"]) == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith(f"clipheads {prog}: error: "), err
    assert sum(": error: " in line for line in lines) == 1, err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and doc["error"]
