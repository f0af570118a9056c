"""Reading back the xlsx sheets the synthetic generators write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openpyxl import load_workbook


def read_sheet(root: Path) -> tuple[tuple[Any, ...], list[str], list[tuple[Any, ...]]]:
    """``root/datasets.xlsx`` (one sheet, "Sheet1"): the super-header row, the column names, the data rows."""
    wb = load_workbook(root / "datasets.xlsx", read_only=True)
    try:
        assert wb.sheetnames == ["Sheet1"]
        rows = [tuple(r) for r in wb["Sheet1"].iter_rows(values_only=True)]
    finally:
        wb.close()
    return rows[0], [str(v) for v in rows[1]], rows[2:]
