"""Regenerate the README between its markers; everything outside stays byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

from autoround_exp.fsutil import write_atomic

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
# A marker is a line of its own: the README may mention the markers in its prose.
_BEGIN = re.compile(rf"^{re.escape(BEGIN)}[ \t]*$", re.MULTILINE)
_END = re.compile(rf"^{re.escape(END)}[ \t]*$", re.MULTILINE)


class MarkerError(ValueError):
    pass


def splice(text: str, block: str) -> str:
    """``text`` with the part between the marker lines replaced by ``block``."""
    begins, ends = list(_BEGIN.finditer(text)), list(_END.finditer(text))
    if len(begins) != 1 or len(ends) != 1 or begins[0].start() > ends[0].start():
        raise MarkerError(
            f"the README needs exactly one {BEGIN} line followed by one {END} line where the results "
            "tables go; add them (or pass --readme '' to skip the README)."
        )
    head, tail = text[: begins[0].end()], text[ends[0].start() :]
    return f"{head}\n{block.strip()}\n{tail}"


def update(path: Path, block: str, check: bool = False) -> bool:
    """True if the README was (check: would be) changed."""
    text = path.read_text()
    new = splice(text, block)
    if new == text:
        return False
    if not check:
        write_atomic(path, new)
    return True
