"""`clipheads serve BUNDLE|HEAD`: a thin wrapper over `bentoml serve clipheads.serving.service:ClipHeads`.

The service reads its configuration from `CLIPHEADS_*` environment variables (front/config.py
`ServeConfig`); this command sets them from flags, binds loopback by default and turns BentoML's
usage tracking off unless `--allow-tracking` is given. Several front workers without a task store
share their few-shot tasks through a private directory that lives as long as the server (the
single front's in-memory store has the same lifetime; `--tasks-dir` keeps them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from clipheads.training import console

from .runtimes import RUNTIME_KINDS  # a light import: torch/ORT load only when a runtime opens
from .front.config import ServeConfig
from .startup import front_workers_problem, runtime_problem, tasks_store_problem
from .tasks import redact

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "clipheads.serving.service:ClipHeads"
PRIVATE_TASKS_DIR = "<a private directory, made at start and removed at exit>"  # what --dry-run shows
NO_ACCESS_LOG = "services.logging.access.enabled=false"  # a BENTOML_CONFIG_OPTIONS entry: every service


def _number(kind: type, low: float, high: Optional[float] = None, what: str = ""):
    """An argparse type: `kind` within [low, high] (a flag that cannot serve is refused at once)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if kind is float else 'whole number'}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what or (f'{low}..{high}' if high else f'>= {low}')}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = console.ArgumentParser(prog="clipheads serve", description="Serve a bundle or head over HTTP (BentoML).")
    p.add_argument("source", help="export bundle directory, a *.head.safetensors file (eager PyTorch), or the tag "
                                  "of a model saved with `clipheads models save` (name[:version])")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 to expose)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=3000)
    p.add_argument("--runtime", default="auto", choices=RUNTIME_KINDS)
    p.add_argument("--tasks-dir", default=None, help="directory where registered few-shot tasks persist (one machine)")
    p.add_argument("--tasks-store", default=None, metavar="DIR|URL",
                   help="where registered few-shot tasks live: a directory, or postgresql://USER@HOST:PORT/DB "
                        "shared by every replica")
    p.add_argument("--auth-token", default=None, help="require 'Authorization: Bearer TOKEN' (or CLIPHEADS_AUTH_TOKEN)")
    p.add_argument("--max-concurrency", type=_number(int, 1), default=None)
    p.add_argument("--front-workers", type=int, default=None, metavar="N",
                   help="HTTP front processes on the port, one encoder behind them (default 1; more for many cores "
                        "feeding a GPU; without --tasks-dir/--tasks-store they share a private task directory, "
                        "removed at exit)")
    p.add_argument("--timeout", type=_number(int, 1), default=None,
                   help="seconds a request may take once its body has arrived (default 30, then 504)")
    p.add_argument("--body-timeout", type=_number(float, 0.001, what="> 0 seconds"), default=None,
                   help="seconds a request body may take to arrive (default 10, then 408)")
    p.add_argument("--grace", type=_number(int, 0), default=30,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT (default 30)")
    p.add_argument("--allow-reload", action="store_true",
                   help="enable POST /admin/reload (swap the head under load; needs --auth-token)")
    p.add_argument("--reload-root", default=None,
                   help="reload paths must lie inside this folder (default: the served source's folder)")
    p.add_argument("--model-configs", default=None, help="extra open_clip model-config directory (custom archs)")
    p.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                   help="a head file's backbone weights if they moved (path, tag or hf-hub id; sha256-checked)")
    p.add_argument("--no-access-log", action="store_true",
                   help="no access-log line per request (errors, warnings and /metrics stay; at concurrency 1 "
                        "the line costs ~12%% of the server's CPU per request, bench/serving/results/README.md)")
    p.add_argument("--allow-tracking", action="store_true", help="let BentoML send usage statistics")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not start")
    console.add_output_flags(p)  # --json: the dry run (or the address served) as JSON; -q: no start-up line
    return p


def check_tasks_store(args: argparse.Namespace) -> Optional[str]:
    """A one-line problem with --tasks-dir/--tasks-store, or None."""
    if args.tasks_dir and args.tasks_store:
        return "give --tasks-dir or --tasks-store, not both"
    store = args.tasks_store or args.tasks_dir or ""
    if args.front_workers is not None and args.front_workers < 1:
        return "--front-workers must be at least 1"
    return tasks_store_problem(store)


def needs_private_tasks_dir(args: argparse.Namespace) -> bool:
    """Several fronts and no task store, from the flags or the environment the server inherits."""
    inherited = ServeConfig.from_env()
    store = args.tasks_store or args.tasks_dir or inherited.tasks_store
    return front_workers_problem(args.front_workers or inherited.front_workers, store) is not None


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    src = Path(args.source).expanduser().resolve()
    env = dict(os.environ)
    env["CLIPHEADS_SOURCE"] = str(src)
    env["CLIPHEADS_RUNTIME"] = args.runtime
    env["CLIPHEADS_HOST"] = args.host
    store = args.tasks_store or args.tasks_dir
    if store:
        env.pop("CLIPHEADS_TASKS_DIR", None)
        env["CLIPHEADS_TASKS_STORE"] = store if "://" in store else str(Path(store).expanduser().resolve())
    if args.auth_token:
        env["CLIPHEADS_AUTH_TOKEN"] = args.auth_token
    if args.max_concurrency:
        env["CLIPHEADS_MAX_CONCURRENCY"] = str(args.max_concurrency)
    if args.front_workers:
        env["CLIPHEADS_FRONT_WORKERS"] = str(args.front_workers)
    if args.timeout:
        env["CLIPHEADS_TIMEOUT_S"] = str(args.timeout)
    if args.body_timeout:
        env["CLIPHEADS_BODY_TIMEOUT_S"] = str(args.body_timeout)
    env["CLIPHEADS_GRACE_S"] = str(args.grace)
    if args.allow_reload:
        env["CLIPHEADS_ALLOW_RELOAD"] = "1"
    if args.reload_root:
        env["CLIPHEADS_RELOAD_ROOT"] = str(Path(args.reload_root).expanduser().resolve())
    if args.model_configs:
        env["CLIPHEADS_MODEL_CONFIGS"] = str(Path(args.model_configs).expanduser().resolve())
    if args.pretrained:
        weights = Path(args.pretrained).expanduser()
        env["CLIPHEADS_BACKBONE_WEIGHTS"] = str(weights.resolve()) if weights.exists() else args.pretrained
    if args.no_access_log:  # BentoML's own setting, which the fast path of /classify follows too (front/fast.py)
        options = env.get("BENTOML_CONFIG_OPTIONS", "").strip()
        env["BENTOML_CONFIG_OPTIONS"] = f"{options} {NO_ACCESS_LOG}".strip()
    if not args.allow_tracking:
        env["BENTOML_DO_NOT_TRACK"] = "true"
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", args.host, "--port", str(args.port),
           "--working-dir", str(REPO_ROOT), "--timeout-graceful-shutdown", str(args.grace)]
    return cmd, env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, code = console.parse(build_parser(), argv)
    if args is None:
        return code
    return console.run("clipheads serve", lambda: _serve(args), as_json=args.json)


def _serve(args) -> int:
    """Bad flags and sources raise console.BadInput (one line, exit 2) before anything starts."""
    from .model_store import ModelStoreError, resolve_source, stored_weights

    try:
        src = resolve_source(args.source)
    except ModelStoreError as err:
        raise console.BadInput(f"no such bundle or head: {err}") from None
    args.source = str(src)
    # Flag checks first: they cost nothing, opening the head reads and hashes files.
    if args.allow_reload and not (args.auth_token or os.environ.get("CLIPHEADS_AUTH_TOKEN")):
        raise console.BadInput("--allow-reload needs --auth-token (or CLIPHEADS_AUTH_TOKEN): admin routes are never open")
    if args.pretrained and not src.is_file():
        raise console.BadInput(f"--pretrained applies to a head file; the bundle {src} holds its backbone in its graphs")
    if src.is_file() and args.runtime not in ("auto", "torch", "torch-folded"):
        raise console.BadInput(f"{src} is a head file; --runtime {args.runtime} needs a bundle")
    if src.is_file():  # moved or mismatched backbone weights: one line here, not a crashing server
        from clipheads.training.backbone_record import check_weights_override
        from clipheads.training.backbone_source import BackboneError
        from clipheads.training.head_header import ArtifactError, read_head_header

        try:  # the header only: the encoder loads the tensors; this process stays free of torch
            check_weights_override(read_head_header(src).backbone, args.pretrained or stored_weights(src))
        except (ArtifactError, BackboneError) as err:
            reason = str(err)
            raise console.BadInput(reason if str(src) in reason else f"{src}: {reason}") from None
    problem = check_tasks_store(args) or runtime_problem(src, args.runtime)
    if problem:
        raise console.BadInput(problem)
    private = needs_private_tasks_dir(args)  # the fronts must see each other's tasks (startup.py)
    made = None  # only a directory made here is ever removed
    if private and not args.dry_run:
        made = args.tasks_dir = tempfile.mkdtemp(prefix="clipheads-tasks-")
        console.info(f"clipheads serve: the front workers share few-shot tasks through {made} "
                     "(removed at exit; --tasks-dir DIR keeps them)", args.quiet)
    try:
        return _run(args, src, private)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


def _run(args, src: Path, private: bool) -> int:
    cmd, env = serve_command(args)
    if private and args.dry_run:
        env["CLIPHEADS_TASKS_STORE"] = PRIVATE_TASKS_DIR
    shown = {k: redact(env[k]) if k == "CLIPHEADS_TASKS_STORE" else env[k]
             for k in sorted(env) if (k.startswith("CLIPHEADS_") and k != "CLIPHEADS_AUTH_TOKEN")
             or k == "BENTOML_CONFIG_OPTIONS"}
    if args.dry_run:
        console.emit({"command": cmd, "env": shown}, args.json,
                      "\n".join([" ".join(cmd), *(f"{k}={v}" for k, v in shown.items())]))
        return 0
    weights = f", backbone weights {env['CLIPHEADS_BACKBONE_WEIGHTS']} (sha256-checked at load)" if args.pretrained else ""
    console.info(f"clipheads serve: {src} on http://{args.host}:{args.port} (runtime {args.runtime}{weights})", args.quiet)
    if args.json:  # one line for a supervisor; BentoML's own logs follow on stderr
        print(json.dumps({"url": f"http://{args.host}:{args.port}", "source": str(src), "runtime": args.runtime}), flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def forward(sig, _frame):
        proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
