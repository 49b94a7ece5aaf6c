"""`clipheads demo`: the whole flow offline, in a few minutes on 2 CPU cores.

generate a small synthetic world -> zero-shot the packaged tiny CLIP on every domain ->
train a 16-shot CoOp head on the held-out domain -> before/after table -> export an ONNX bundle
(parity-gated) -> serve it with BentoML and classify one image over HTTP.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence


class Steps:
    """Numbered steps, each printing what it does and a one-line result."""

    def __init__(self, total: int):
        self.total, self.i = total, 0

    def run(self, title: str, fn: Callable[[], tuple[object, str]]):
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {title}", flush=True)
        start = time.perf_counter()
        value, line = fn()
        print(f"  -> {line} ({time.perf_counter() - start:.1f}s)", flush=True)
        return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classify_over_http(bundle: Path, image: Path, port: int) -> dict:
    """Start `clipheads serve`, wait for /readyz, POST one image to /classify, stop the server."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipheads", "serve", str(bundle), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not become ready in 180 s")
            time.sleep(1)
        boundary = "clipheadsdemo"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode() + image.read_bytes() + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{base}/classify", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="clipheads demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=None, help="default: the synth_coop_heldout recipe's")
    p.add_argument("--no-serve", action="store_true", help="stop after the export step")
    p.add_argument("--backbone", default=None, help="default: the packaged clipheads-tiny")
    p.add_argument("--pretrained", default=None, help="default: the backbone's default weights")
    p.add_argument("--domain", default=None, help="domain to tune on (default: the one the tiny CLIP saw least)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clipheads.training.backbone import PACKAGED_ARCH, load_backbone
    from clipheads.training.data.fewshot import few_shot_splits
    from clipheads.training.data.synth import generate_world, load_world_splits
    from clipheads.training.artifact import save_head
    from clipheads.training.loop import TrainConfig, evaluate, train_head
    from clipheads.training.methods import TaskSpec, build_method

    out = Path(args.out)
    steps = Steps(6 if args.no_serve else 7)
    world_dir = steps.run("generate the synthetic world (small)", lambda: (lambda d: (d, f"{d}"))(generate_world(out / "world", seed=0, size="small")))
    world = json.loads((world_dir / "world.json").read_text())
    domains = [d if isinstance(d, str) else d["name"] for d in world["domains"]]
    from clipheads.training.pretrain import HELD_OUT_DOMAIN

    held = args.domain or HELD_OUT_DOMAIN
    if held not in domains:
        raise SystemExit(f"--domain must be one of {', '.join(domains)}; got {held!r}")
    backbone = steps.run("load the packaged tiny CLIP", lambda: (lambda b: (b, f"{b.arch} / {b.pretrained}, sha256 {str(b.weights_sha256)[:12]}…"))(
        load_backbone(args.backbone or PACKAGED_ARCH, args.pretrained)))
    splits = {d: load_world_splits(world_dir, d) for d in domains}

    def zero_shot():
        accs = {}
        for d, s in splits.items():
            head = build_method("zeroshot", backbone, [TaskSpec(d, s.classnames, s.templates)])
            accs[d] = evaluate(head, s.test)["top1"]
        return accs, ", ".join(f"{d} {a:.1%}" for d, a in accs.items()) + f" (chance {1 / len(splits[held].classnames):.1%})"

    zs = steps.run("zero-shot top-1 per domain", zero_shot)

    def train():
        # the same settings as the committed results table (recipe synth_coop_heldout)
        from clipheads.training.protocols.recipes import load_recipe

        recipe = load_recipe("synth_coop_heldout")
        s = few_shot_splits(splits[held], args.shots, args.seed)
        head = build_method("coop", backbone, [TaskSpec(held, s.classnames, s.templates)], recipe.method_config)
        cfg = TrainConfig(**{**recipe.train, "epochs": args.epochs or recipe.train["epochs"], "seed": args.seed})
        res = train_head(head, {0: s.train}, cfg)
        acc = evaluate(head, splits[held].test)["top1"]
        path = save_head(head, out / f"coop-{held}.head.safetensors", {**res.summary(), "shots": args.shots, "seed": args.seed,
                                                                       "metrics": {"test_top1": {held: acc}}})
        return (path, acc), f"{args.shots}-shot CoOp on {held}: loss {res.first_loss:.2f} -> {res.final_loss:.2f}, wrote {path}"

    head_path, tuned = steps.run(f"train a CoOp head on the held-out domain '{held}'", train)

    def table():
        rows = [f"  {'domain':<10} {'zero-shot':>10} {'CoOp':>8}"]
        for d in domains:
            rows.append(f"  {d:<10} {zs[d]:>10.1%} {(f'{tuned:.1%}' if d == held else ''):>8}")
        return None, f"held-out '{held}': {zs[held]:.1%} -> {tuned:.1%} ({100 * (tuned - zs[held]):+.1f} points)\n" + "\n".join(rows)

    steps.run("before / after", table)

    bundle = out / "bundle"

    def export():
        from clipheads.export.cli import main as export_main

        code = export_main([str(head_path), "--out", str(bundle), "--target", "onnx", "--precision", "fp32"])
        if code != 0:
            raise SystemExit(f"export failed with exit code {code}")
        manifest = json.loads((bundle / "manifest.json").read_text())
        parity = manifest.get("parity", {})
        verdict = "passed" if parity.get("passed") else "FAILED"
        return bundle, f"{bundle}: {len(manifest.get('graphs', []))} graph(s), {parity.get('precision', '?')} parity gate {verdict}"

    steps.run("export an ONNX bundle behind the parity gate", export)
    if args.no_serve:
        return 0
    image = Path(splits[held].test[0].path)

    def serve():
        reply = _classify_over_http(bundle, image, _free_port())
        return reply, f"{image.name} (true: {splits[held].test[0].classname}) -> {json.dumps(reply)[:300]}"

    steps.run("serve the bundle and classify one image over HTTP", serve)
    print("\ndemo finished: see", out)
    return 0
