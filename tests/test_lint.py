"""pyflakes over the package and its tests: undefined names, unused imports, shadowed loop variables.

The undefined-name class is a real bug that only shows on the path that reaches it (an error branch,
a rarely used option), so it is checked on every file, not left to the paths the tests happen to
run. A finding on a line marked `# noqa` (an import that checks availability or re-exports) is
accepted, as flake8 would."""
from __future__ import annotations

from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import reporter as pyflakes_reporter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("clipheads", "training", "export", "serving", "tests", "bench")


class _Collect(pyflakes_reporter.Reporter):
    def __init__(self):
        self.found: list[str] = []

    def unexpectedError(self, filename, msg):  # noqa: N802 - pyflakes' interface
        self.found.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def flake(self, message):
        line = Path(message.filename).read_text().splitlines()[message.lineno - 1]
        if "# noqa" not in line:
            self.found.append(str(message))


def test_no_pyflakes_findings():
    report = _Collect()
    files = sorted(p for d in CHECKED for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 100
    for path in files:
        pyflakes_api.checkPath(str(path), report)
    assert not report.found, "\n".join(report.found)


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    return undefined_name\n")
    report = _Collect()
    pyflakes_api.checkPath(str(bad), report)
    assert len(report.found) == 2  # the unused import and the undefined name
