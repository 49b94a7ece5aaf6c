"""The `clipheads` entry point: dispatches to each part's own commands.

training: train, eval, info, methods, data, bench   export: export   serving: serve, score, models
`demo` runs the whole flow end to end.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# Commands owned by another part: name -> (module with `main(argv)`, one-line help).
DELEGATED = {
    "export": ("clipheads.export.cli", "fold heads into an ONNX/TensorRT bundle (parity-gated)"),
    "serve": ("clipheads.serving.cli", "serve a bundle or head over HTTP (BentoML)"),
    "score": ("clipheads.serving.scoring.cli", "batch-score images with a bundle into Parquet"),
    "models": ("clipheads.serving.model_store", "save/list heads and bundles in BentoML's model store"),
    "bench": ("clipheads.training.protocols.cli", "run a paper protocol recipe and write a report"),
    "demo": ("clipheads.demo", "offline end-to-end demo on the synthetic world"),
}
TRAINING_COMMANDS = {
    "train": "train a head (any method) on a dataset; writes a .head.safetensors",
    "eval": "top-1 of a head, or of zero-shot CLIP without one",
    "info": "what a head file holds (method, backbone, tasks, metrics)",
    "methods": "list the methods with their trainable-parameter counts on a backbone",
    "data": "generate the synthetic world (`clipheads data synth OUT`)",
    "convert": "an OpenAI .pt / state-dict checkpoint -> open_clip safetensors (records the activation)",
}


GLOBAL_FLAGS = ("-q", "--quiet", "--json")  # accepted before the command too: `clipheads -q train ...`


def _usage() -> str:
    lines = ["usage: clipheads [-q|--quiet] [--json] COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {c:<8} {h}" for c, h in TRAINING_COMMANDS.items()]
    lines += [f"  {c:<8} {h}" for c, (_, h) in DELEGATED.items()]
    lines += ["", "`clipheads COMMAND --help` for a command's options. Every command takes --json (the result as",
              "JSON on stdout) and -q/--quiet (no progress bars or informational messages). Exit codes: 0 ok,",
              "1 failure, 2 bad usage or bad input."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = []
    while argv and argv[0] in GLOBAL_FLAGS:  # global flags travel to the end of the command's own options
        leading.append(argv.pop(0))
    if leading and argv and argv[0] not in ("-h", "--help", "-V", "--version"):
        end = argv.index("--") if "--" in argv else len(argv)  # after a `--` they would be positionals
        argv[end:end] = (["--quiet"] if {"-q", "--quiet"} & set(leading) else []) + (["--json"] if "--json" in leading else [])
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from clipheads import __version__

        print(f"clipheads {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in DELEGATED:
        module = importlib.import_module(DELEGATED[command][0])
        return int(module.main(rest) or 0)
    if command in TRAINING_COMMANDS:
        from clipheads.training import cli

        return cli.main(argv)
    print(f"clipheads: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
