"""deploy/CONFORMANCE.md stays true: its tables are compared with the lists in the code.

Each table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->``. When a list in the code
changes (a transfer syntax added or dropped, a status code, an SR code), the failure names the rows
to add to or remove from the statement.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.sr.coding import Code
from pydicom.uid import UID

from screener.dicom import companion, image, listener, sender, sr

ROOT = Path(__file__).resolve().parents[2]
STATEMENT = ROOT / "deploy" / "CONFORMANCE.md"
VERIFICATION = "1.2.840.10008.1.1"
UID_RX = re.compile(r"^\d+(\.\d+)+$")


def table(name: str) -> list[list[str]]:
    """The body rows (cells stripped) of the named table."""
    text = STATEMENT.read_text(encoding="utf-8")
    m = re.search(rf"<!-- table: {re.escape(name)} -->\n(.*?)<!-- end table -->", text, re.S)
    assert m, f"deploy/CONFORMANCE.md has no table {name!r}"
    rows = [line for line in m.group(1).splitlines() if line.startswith("|")]
    body = rows[2:]  # header and separator
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in body]


def uids_in(name: str) -> set[str]:
    return {cell.strip("`") for row in table(name) for cell in row if UID_RX.match(cell.strip("`"))}


def diff_message(what: str, documented: set[str], in_code: set[str]) -> str:
    def label(u: str) -> str:
        return f"{u} ({UID(u).name})" if UID_RX.match(u) else u

    missing = sorted(in_code - documented)
    extra = sorted(documented - in_code)
    return (
        f"deploy/CONFORMANCE.md, {what}: add rows for {[label(u) for u in missing]}, "
        f"remove rows for {[label(u) for u in extra]}"
    )


def test_scp_transfer_syntaxes():
    documented, code = uids_in("scp-transfer-syntaxes"), set(listener.TRANSFER_SYNTAXES)
    assert documented == code, diff_message("4.2.1 SCP transfer syntaxes", documented, code)


def test_scp_sop_classes():
    documented = uids_in("scp-sop-classes")
    code = set(image.SCREENED_SOP_CLASSES) | set(listener.STORAGE_SOP_CLASSES) | {VERIFICATION}
    assert documented == code, diff_message("4.2.1 SCP SOP classes", documented, code)


def test_scu_sop_classes():
    documented = uids_in("scu-sop-classes")
    code = {str(sender.Comprehensive3DSRStorage), str(sender.ComprehensiveSRStorage)} | set(
        companion.COMPANION_SOP_CLASSES
    )
    assert documented == code, diff_message("4.2.2 SCU SOP classes", documented, code)


def test_scu_transfer_syntaxes():
    documented, code = uids_in("scu-transfer-syntaxes"), set(sender.TRANSFER_SYNTAXES)
    assert documented == code, diff_message("4.2.2 SCU transfer syntaxes", documented, code)


def _status_constants() -> set[int]:
    return {
        v
        for k, v in vars(listener).items()
        if k.isupper() and not k.startswith("_") and isinstance(v, int) and not isinstance(v, bool) and v <= 0xFFFF
    }


def test_scp_status_codes():
    documented = {int(row[0], 16) for row in table("scp-status-codes")}
    code = _status_constants()
    assert code, "no status constants found in screener/dicom/listener.py"
    assert documented == code, diff_message(
        "4.2.1 C-STORE statuses", {f"0x{v:04X}" for v in documented}, {f"0x{v:04X}" for v in code}
    )


def _sr_codes() -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    for value in vars(sr).values():
        items = value.values() if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, Code):
                found.add((item.value, item.scheme_designator, item.meaning))
    return found


def test_sr_codes():
    documented = {(row[1].strip("`"), row[2].strip("`"), row[3]) for row in table("sr-codes")}
    code = _sr_codes()
    assert len(code) >= 14
    assert documented == code, diff_message(
        "8.3 SR codes", {" ".join(c) for c in documented}, {" ".join(c) for c in code}
    )


def test_every_remaining_validator_warning_is_explained():
    text = STATEMENT.read_text(encoding="utf-8")
    from tests.dicom.test_pixelmed import PIXELMED_EXPLAINED_WARNINGS
    from tests.dicom.test_sr import DCIODVFY_EXPLAINED

    for phrase in DCIODVFY_EXPLAINED:
        assert phrase in text, f"dciodvfy warning not explained in deploy/CONFORMANCE.md 8.7: {phrase}"
    assert len(PIXELMED_EXPLAINED_WARNINGS) == 2
    for phrase in ('TEXT (122405,DCM,"Algorithm Manufacturer"): Content Item not in template', "99CSPINE"):
        assert phrase in text


@pytest.mark.parametrize("value", ["CSPINE", "11112"])
def test_defaults_named_in_the_statement(value):
    from screener import config

    node = config.NodeSettings()
    assert value in (node.ae_title, str(node.port))
    assert value in STATEMENT.read_text(encoding="utf-8")
