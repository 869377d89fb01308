"""simulations/docsplice.py: the one way a report writes into a doc."""

import pytest

from simulations.docsplice import SpliceError, markers, splice


def test_splice_replaces_only_the_named_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- a -->\nold\n<!-- /a -->\nmiddle\n<!-- b -->\nkeep\n<!-- /b -->\noutro\n")
    splice(doc, "a", "new\ntable\n")
    assert doc.read_text() == "intro\n<!-- a -->\nnew\ntable\n<!-- /a -->\nmiddle\n<!-- b -->\nkeep\n<!-- /b -->\noutro\n"
    splice(doc, "a", "again")  # a missing final newline is added, so the end marker keeps its own line
    assert "<!-- a -->\nagain\n<!-- /a -->\nmiddle" in doc.read_text()
    assert markers("communication:results") == ("<!-- communication:results -->", "<!-- /communication:results -->")


def test_a_page_without_the_block_is_refused_unless_a_heading_is_given(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nno markers\n")
    with pytest.raises(SpliceError, match="section to fill"):
        splice(doc, "a", "x\n")
    with pytest.raises(ValueError, match="no such file"):
        splice(tmp_path / "missing.md", "a", "x\n")
    assert doc.read_text() == "# Title\n\nno markers\n"
    splice(doc, "a", "x\n", heading="## A")
    splice(doc, "a", "y\n", heading="## A")  # the second time the block is there: replaced, not added
    assert doc.read_text() == "# Title\n\nno markers\n\n## A\n\n<!-- a -->\ny\n<!-- /a -->\n"
    splice(tmp_path / "new.md", "a", "z\n", heading="## A")
    assert (tmp_path / "new.md").read_text() == "\n## A\n\n<!-- a -->\nz\n<!-- /a -->\n"


def test_an_end_marker_before_the_start_does_not_count(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- /a -->\n<!-- a -->\nold\n")
    with pytest.raises(SpliceError):
        splice(doc, "a", "x\n")
