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
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence


class Steps:
    """Numbered steps, each printing what it does and a one-line result (to `stream`; none when quiet)."""

    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.i = total, 0
        self.stream, self.quiet = stream or sys.stdout, quiet
        self.results: dict = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def run(self, title: str, fn: Callable[[], tuple[object, str]]):
        self.i += 1
        self.say(f"\n[{self.i}/{self.total}] {title}")
        start = time.perf_counter()
        value, line = fn()
        seconds = time.perf_counter() - start
        self.say(f"  -> {line} ({seconds:.1f}s)")
        self.results[title] = {"result": line, "seconds": round(seconds, 2)}
        return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classify_over_http(bundle: Path, image: Path, port: int) -> dict:
    """Start `clipheads serve`, wait for /readyz, POST one image to /classify, stop the server."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipheads", "serve", str(bundle), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=log, env=env, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited early:\n{log.read()[-2000:]}")
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
        log.close()


DEMO_WORLD = "small"  # the world preset the demo writes
MIN_PROBES = 4  # export.pipeline.ExportOptions.validate: the parity gate needs at least 4 probe images


def main(argv: Optional[Sequence[str]] = None) -> int:
    from clipheads.training import console
    from clipheads.training.data.synth import WORLD_SIZES, int_range

    max_shots = WORLD_SIZES[DEMO_WORLD].train
    p = console.ArgumentParser(prog="clipheads demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out",
                   help="output folder (world, head, bundle); a directory or a path that does not exist yet. "
                        "A rerun replaces the world in OUT/world")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=1, help="seed for few-shot sampling and training")
    p.add_argument("--shots", type=int_range(1, max_shots), default=16,
                   help=f"images per class for the CoOp head, 1..{max_shots} (the {DEMO_WORLD} world's training images)")
    p.add_argument("--epochs", type=int_range(1), default=None, help=">= 1; default: the synth_coop_heldout recipe's")
    p.add_argument("--no-serve", action="store_true", help="stop after the export step")
    p.add_argument("--gate-images", "--probes", dest="probes", type=int_range(MIN_PROBES), default=None,
                   help=f"real images the export's parity gate judges on, >= {MIN_PROBES} (default: the exporter's, 256)")
    p.add_argument("--backbone", default=None, help="default: the packaged clipheads-tiny")
    p.add_argument("--pretrained", default=None, help="default: the backbone's default weights")
    p.add_argument("--domain", default=None, help="domain to tune on (default: the one the tiny CLIP saw least)")
    console.add_output_flags(p)
    args, code = console.parse(p, argv)
    if args is None:
        return code
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clipheads.training.backbone import BackboneError
    from clipheads.training.data.synth import WorldExistsError

    return console.run("clipheads demo", lambda: _demo(args), (BackboneError, WorldExistsError), as_json=args.json)


def _demo(args) -> int:
    from clipheads.api import export_bundle
    from clipheads.training import console, fit
    from clipheads.training.backbone import PACKAGED_ARCH, load_backbone
    from clipheads.training.data.synth import DOMAINS, generate_world, load_world_splits
    from clipheads.training.loop import evaluate
    from clipheads.training.methods import TaskSpec, build_method
    from clipheads.training.pretrain import HELD_OUT_DOMAIN

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked before any work
        raise console.BadInput(f"--out {out} exists and is not a directory")
    if args.domain is not None and args.domain not in DOMAINS:
        raise console.BadInput(f"--domain must be one of {', '.join(DOMAINS)}; got {args.domain!r}")
    steps = Steps(6 if args.no_serve else 7, stream=sys.stderr if args.json else sys.stdout, quiet=args.quiet)
    world_dir = steps.run(f"generate the synthetic world ({DEMO_WORLD})",
                          lambda: (lambda d: (d, f"{d}"))(generate_world(out / "world", seed=0, size=DEMO_WORLD,
                                                                         progress=not args.quiet, overwrite=True)))
    world = json.loads((world_dir / "world.json").read_text())
    domains = [d if isinstance(d, str) else d["name"] for d in world["domains"]]
    held = args.domain if args.domain is not None else HELD_OUT_DOMAIN
    if held not in domains:
        raise console.BadInput(f"--domain must be one of {', '.join(domains)}; got {held!r}")
    backbone = steps.run("load the packaged tiny CLIP", lambda: (lambda b: (b, f"{b.arch} / {b.pretrained}, sha256 {str(b.weights_sha256)[:12]}…"))(
        load_backbone(args.backbone if args.backbone is not None else PACKAGED_ARCH, args.pretrained)))
    splits = {d: load_world_splits(world_dir, d) for d in domains}

    def zero_shot():
        accs = {}
        for d, s in splits.items():
            head = build_method("zeroshot", backbone, [TaskSpec(d, s.classnames, s.templates)])
            accs[d] = evaluate(head, s.test)["top1"]
        return accs, ", ".join(f"{d} {a:.1%}" for d, a in accs.items()) + f" (chance {1 / len(splits[held].classnames):.1%})"

    zs = steps.run("zero-shot top-1 per domain", zero_shot)

    def train():
        # the library call behind `clipheads train`, with the committed results table's recipe
        head = fit.train("coop", {held: f"synthetic:{world_dir}:{held}"}, backbone=backbone, recipe="synth_coop_heldout", shots=args.shots,
                         seed=args.seed, progress=not args.quiet, out=out / f"coop-{held}.head.safetensors",
                         **({"epochs": args.epochs} if args.epochs is not None else {}))
        rec = head.training_record
        m = rec["metrics"]
        return (Path(rec["head"]), m["test_top1"][held]), (f"{args.shots}-shot CoOp on {held}: loss {m['first_loss']:.2f} -> "
                                                           f"{m['final_loss']:.2f}, wrote {rec['head']}")

    head_path, tuned = steps.run(f"train a CoOp head on the held-out domain '{held}'", train)

    def table():
        rows = [f"  {'domain':<10} {'zero-shot':>10} {'CoOp':>8}"]
        for d in domains:
            rows.append(f"  {d:<10} {zs[d]:>10.1%} {(f'{tuned:.1%}' if d == held else ''):>8}")
        return None, f"held-out '{held}': {zs[held]:.1%} -> {tuned:.1%} ({100 * (tuned - zs[held]):+.1f} points)\n" + "\n".join(rows)

    steps.run("before / after", table)
    bundle = out / "bundle"

    def export():
        result = export_bundle(head_path, bundle, target="onnx", precision="fp32",
                               **({"probes": args.probes} if args.probes is not None else {}))
        if not result.passed:
            raise RuntimeError(f"export failed the parity gate: {result.parity.get('failures')}")
        m = result.manifest
        return bundle, f"{bundle}: {len(m.get('graphs', []))} graph(s), {m['parity'].get('precision', '?')} parity gate passed"

    steps.run("export an ONNX bundle behind the parity gate", export)
    reply = None
    if not args.no_serve:
        image = Path(splits[held].test[0].path)

        def serve():
            r = _classify_over_http(bundle, image, _free_port())
            return r, f"{image.name} (true: {splits[held].test[0].classname}) -> {json.dumps(r)[:300]}"

        reply = steps.run("serve the bundle and classify one image over HTTP", serve)
    steps.say(f"\ndemo finished: see {out}")
    console.emit({"out": str(out.resolve()), "held_out_domain": held, "zero_shot_top1": zs, "tuned_top1": tuned,
                  "head": str(head_path), "bundle": str(bundle), "http_reply": reply, "steps": steps.results},
                 args.json)
    return 0
