"""Command-line conventions every `clipheads` command shares (training, export and serving alike).

* Exit codes: 0 ok, 1 failure (e.g. a parity gate), 2 bad usage or bad input, 130 interrupted.
* Bad input is one line on stderr, `clipheads CMD: error: ...`, never a traceback.
* `--json`: the result as one JSON document on stdout; human text otherwise. Logs go to stderr.
* `-q/--quiet`: no progress bars and no informational stderr lines (errors still print).
  `clipheads -q CMD` and `clipheads CMD -q` mean the same.
* Progress bars only when stderr is a terminal: a redirected run writes no carriage-return frames.

The library never sees these flags: commands pass `progress=...` and print what functions return.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Iterable, Optional, TextIO

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadInput(ValueError):
    """Bad usage or input found by a command itself (exit code 2)."""


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """`--json` and `-q/--quiet`, the flags every command takes."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or informational messages")


def is_tty(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(iterable: Optional[Iterable] = None, *, enabled: bool = True, file: Optional[TextIO] = None, **kw):
    """A tqdm bar that draws only when `enabled` and its stream (stderr) is a terminal."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    return tqdm(iterable, file=file, disable=not (enabled and is_tty(file)), **kw)


def emit(payload: Any, as_json: bool, human: str = "") -> None:
    """The command's result: JSON (one document) or the human text, on stdout."""
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    elif human:
        print(human)


def info(message: str, quiet: bool = False) -> None:
    """An informational line on stderr (suppressed by --quiet)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def error_line(prog: str, err: BaseException | str) -> str:
    text = str(err).strip() or type(err).__name__
    return f"{prog}: error: {text}"


def run(prog: str, fn: Callable[[], int], bad_input: tuple[type[BaseException], ...] = (),
        as_json: bool = False) -> int:
    """Run a command body: bad input -> one line and exit 2 (with `{"ok": false, ...}` on stdout
    under --json); Ctrl-C -> 130. Anything else is a bug and keeps its traceback."""
    try:
        return int(fn() or 0)
    except (BadInput, *bad_input) as err:
        print(error_line(prog, err), file=sys.stderr)
        if as_json:
            print(json.dumps({"ok": False, "exit_code": EXIT_BAD_INPUT, "error": str(err)}))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises BadInput instead of exiting, so callers in-process (tests, the top-level
    dispatcher) get exit code 2 and one line; `--help` still prints and exits 0."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        err = BadInput(f"{message} (see `{self.prog} --help`)")
        err.prog = self.prog
        raise err


def parse(parser: argparse.ArgumentParser, argv) -> tuple[Optional[argparse.Namespace], Optional[int]]:
    """(args, None), or (None, exit code) for --help (0) and bad usage (2, one line printed)."""
    try:
        return parser.parse_args(argv), None
    except BadInput as err:
        print(f"{getattr(err, 'prog', parser.prog)}: error: {err}", file=sys.stderr)
        if "--json" in (sys.argv[1:] if argv is None else list(argv)):  # bad usage under --json: still a JSON answer
            print(json.dumps({"ok": False, "exit_code": EXIT_BAD_INPUT, "error": str(err)}))
        return None, EXIT_BAD_INPUT
    except SystemExit as e:  # --help / --version
        return None, int(e.code or 0)
