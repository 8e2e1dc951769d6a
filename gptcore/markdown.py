"""Markdown tables as every viewer renders them: MLflow's artifact viewer, Prefect's artifacts, GitHub."""

from __future__ import annotations


def cell(value: object) -> str:
    """A value as one table cell: `|` escaped (it would end the cell), lines joined with ' / '
    (a newline ends the row, and MLflow's viewer shows `<br>` as text); empty as *(nothing)*."""
    return " / ".join(str(value).replace("|", "\\|").splitlines()) or "*(nothing)*"


def table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    """A GitHub-flavoured markdown table; every header and value goes through `cell`."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells: {header}")
    lines = ["| " + " | ".join(cell(c) for c in line) + " |" for line in (header, *rows)]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])
