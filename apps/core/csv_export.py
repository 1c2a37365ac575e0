"""CSV downloads of user data that spreadsheets cannot turn into formulas (CSV/formula injection)."""

import csv
import io
from collections.abc import Iterable, Sequence

# A cell starting with one of these is read as a formula by Excel, LibreOffice and Google Sheets.
_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_TRIGGERS) else text


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([neutralise_cell(cell) for cell in header])
    for row in rows:
        writer.writerow([neutralise_cell(cell) for cell in row])
    return buffer.getvalue()
