"""README regeneration between the markers: idempotent, the rest untouched byte for byte."""

from __future__ import annotations

import pytest

from autoround_exp.report import readme

TEXT = "# Title\n\nintro  with  odd   spacing\n\n<!-- results:begin -->\nold tables\n<!-- results:end -->\n\ntail\n"


def test_block_is_replaced_and_everything_else_kept_byte_for_byte():
    new = readme.splice(TEXT, "new tables")
    assert new == TEXT.replace("old tables", "new tables")
    assert readme.splice(new, "new tables") == new


def test_markers_mentioned_in_prose_are_not_markers():
    text = "Between `<!-- results:begin -->` and `<!-- results:end -->` below.\n\n" + TEXT
    assert readme.splice(text, "new") == text.replace("old tables", "new")


def test_update_writes_only_when_the_block_changes(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(TEXT)
    assert readme.update(path, "new") is True
    mtime = path.stat().st_mtime_ns
    assert readme.update(path, "new") is False and path.stat().st_mtime_ns == mtime


def test_check_reports_a_stale_block_without_writing(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(TEXT)
    assert readme.update(path, "new", check=True) is True and path.read_text() == TEXT


@pytest.mark.parametrize(
    "text",
    [
        "no markers\n",
        "<!-- results:end -->\n<!-- results:begin -->\n",
        "<!-- results:begin -->\n" * 2 + "<!-- results:end -->",
    ],
)
def test_missing_or_broken_markers_say_what_to_add(text):
    with pytest.raises(readme.MarkerError, match="results:begin"):
        readme.splice(text, "x")
