import pytest

from apps.core.csv_export import csv_text, neutralise_cell


@pytest.mark.parametrize("cell", ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\rx"])
def test_formula_triggers_are_neutralised(cell):
    assert neutralise_cell(cell) == "'" + cell


def test_plain_cells_are_untouched():
    assert csv_text(["a", "b"], [["plain", 3], [None, "x=y"]]) == "a,b\r\nplain,3\r\n,x=y\r\n"
