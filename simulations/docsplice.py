"""Generated text in the docs: one marker format and one function that fills it.

A generated block of a Markdown page sits between two HTML comments, which Markdown does not
show::

    <!-- privacy -->
    (written by python -m simulations.privacy_report; edits here are overwritten)
    <!-- /privacy -->

:func:`splice` replaces what is between the markers of a name and leaves the rest of the
page as it is, so prose around a table survives every rerun of its report.
"""

from __future__ import annotations

from pathlib import Path


class SpliceError(ValueError):
    """The page has no block of that name to fill."""


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of the block ``name``."""
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def splice(path: Path, name: str, text: str, *, heading: str | None = None) -> None:
    """Write ``text`` between the markers of ``name`` in the page at ``path``.

    A page without them (or no page) is refused with :class:`SpliceError`, unless
    ``heading`` is given: then the block is added at the end of the page (created if
    missing) as a new section under that heading.
    """
    start, end = markers(name)
    text = text if text.endswith("\n") or not text else text + "\n"
    block = f"{start}\n{text}{end}"
    page = path.read_text() if path.is_file() else None
    i = -1 if page is None else page.find(start)
    j = -1 if i < 0 else page.find(end, i + len(start))
    if j >= 0:
        path.write_text(page[:i] + block + page[j + len(end):])
    elif heading is not None:
        path.write_text(f"{page or ''}\n{heading}\n\n{block}\n")
    elif page is None:
        raise SpliceError(f"{path}: no such file; give the Markdown page that holds the {start} ... {end} section")
    else:
        raise SpliceError(f"{path} has no '{start}' ... '{end}' section to fill")
