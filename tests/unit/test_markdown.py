"""Markdown tables whose every cell survives the viewers: Prefect's artifacts, MLflow's, GitHub."""

import re

import pytest

from gptcore.markdown import cell, table


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_a_value_with_pipes_and_lines_stays_in_its_cell():
    rendered = table(
        ("what", "value"), [("ONNX parity", "LM max |dlogit| 1e-05; chat max |dlogit| 2e-05"), ("a", "b\nc")]
    )
    header, rule, *rows = rendered.splitlines()
    assert cells(header) == ["what", "value"] and rule == "|---|---|"
    assert [len(cells(row)) for row in rows] == [2, 2]
    assert cells(rows[0])[1] == "LM max \\|dlogit\\| 1e-05; chat max \\|dlogit\\| 2e-05"
    assert cells(rows[1])[1] == "b / c"  # a newline would end the row; MLflow shows <br> as text


def test_an_empty_value_says_so_and_a_short_row_is_refused():
    assert cell("") == "*(nothing)*" and cell(0) == "0"
    with pytest.raises(ValueError, match="2 cells"):
        table(("a", "b"), [("only one",)])
