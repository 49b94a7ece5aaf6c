"""The guard's scan for `Content-Disposition:` lines (url_not_allowed) is the case-insensitive,
multiline regex it replaced, on random bodies and at window edges (serving/front/guard.py)."""
from __future__ import annotations

import random
import re

import pytest

from clipheads.serving.front import guard

REGEX = re.compile(rb"(?im)^content-disposition:[^\r\n]*")
PIECES = [b"content-disposition: form-data; name=images", b"\r\n", b"\n", b"\r", b"CONTENT-DISPOSITION:x",
          b'Content-Disposition: form-data; name="images"; filename="a.png"', b"Content-Disposition:",
          b"abc", b"content-dispositio", b"n:", b"\x00\xff\x0a"]


@pytest.mark.parametrize("window", [1 << 20, 3, 21, 64])
def test_disposition_lines_match_the_regex(monkeypatch, window):
    monkeypatch.setattr(guard, "_WINDOW", window)
    rng = random.Random(window)
    for _ in range(1500):
        body = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))
        assert guard.disposition_lines(body) == [m.group(0) for m in REGEX.finditer(body)], body
