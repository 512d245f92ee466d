"""CSV files for spreadsheets: every cell quoted, no cell a spreadsheet would run as a formula."""

import csv
import re

# OWASP's CSV injection guidance: a spreadsheet runs a cell that starts with one of these. A cell
# starts not only at the start of a value: Excel in many locales splits on `;`, others on `,` or a
# tab, and a line break starts a new row; so a trigger after any of those (and after spaces, which
# importers may trim) is defused too, with the single quote that makes a spreadsheet read text.
_FORMULA_START = re.compile(r"(^|[,;\t\r\n])([ ]*)(?=[=+\-@\t\r])")


def safe_cell(value):
    """Return `value` as text that no spreadsheet runs as a formula, however it splits the line."""
    if value is None:
        return ""
    return _FORMULA_START.sub(r"\1\2'", str(value))


def writer(out):
    """Return a csv writer over `out` that quotes every cell."""
    return csv.writer(out, quoting=csv.QUOTE_ALL)


def safe_row(values):
    """Return the cells of one line, each made safe."""
    return [safe_cell(value) for value in values]
