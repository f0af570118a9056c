import json

import pytest

from screener.engine import preprocessing as pp
from screener.errors import DataError
from tests.conftest import write_sheet
from trainer.cli import main
from trainer.data import csxa
from trainer.data.prepare import prepare_samples


def test_loads_and_groups_patients(mini_csxa):
    samples, report = csxa.load(mini_csxa)
    assert len(samples) == 6
    assert all(len(s.id) == 7 for s in samples)
    groups = {s.number: s.group for s in samples}
    assert groups[1] == groups[2] and groups[5] == groups[6] and groups[3] != groups[4]
    assert {s.label for s in samples} == {0, 1}


def test_join_on_first_four_digits(mini_csxa):
    png = mini_csxa / "datasets-PNG" / "0001035.png"
    png.rename(png.with_name("0001036.png"))  # age in the file name differs from the sheet
    (mini_csxa / "datasets-JSON" / "0001035.json").rename(mini_csxa / "datasets-JSON" / "0001036.json")
    samples, _ = csxa.load(mini_csxa)
    s = next(s for s in samples if s.number == 1)
    assert s.age == 35 and s.id == "0001036"


def test_rows_without_image_counted(mini_csxa):
    (mini_csxa / "datasets-PNG" / "0002035.png").unlink()
    samples, report = csxa.load(mini_csxa)
    assert len(samples) == 5 and report.rows_without_image == 1


def test_duplicate_label_first_wins(mini_csxa):
    p = mini_csxa / "datasets-JSON" / "0001035.json"
    data = json.loads(p.read_text())
    data["shapes"].append({"label": "C3 top right", "points": [[999.0, 999.0]], "shape_type": "point"})
    p.write_text(json.dumps(data))
    samples, report = csxa.load(mini_csxa)
    s = next(s for s in samples if s.number == 1)
    assert s.keypoints["C3 top right"] != (999.0, 999.0)
    assert report.duplicate_labels and report.duplicate_labels[0]["label"] == "C3 top right"


def test_missing_keypoints_skipped_when_needed(mini_csxa):
    p = mini_csxa / "datasets-JSON" / "0003150.json"
    data = json.loads(p.read_text())
    data["shapes"] = data["shapes"][:10]
    p.write_text(json.dumps(data))
    samples, report = csxa.load(mini_csxa, need_keypoints=True)
    assert len(samples) == 5
    assert any("0003150.json" in s["file"] and "missing" in s["reason"] for s in report.skipped)
    samples, _ = csxa.load(mini_csxa, need_keypoints=False)
    assert len(samples) == 6


def test_corrupt_png_skipped_and_counted(mini_csxa):
    (mini_csxa / "datasets-PNG" / "0004151.png").write_bytes(b"not a png")
    samples, report = csxa.load(mini_csxa)
    kept, arr = prepare_samples(samples, pp.recipe("original", 32), report, progress=False)
    assert len(kept) == 5 and arr.shape == (5, 32, 32, 3)
    assert any("0004151.png" in s["file"] and "corrupt" in s["reason"] for s in report.skipped)


def test_folder_without_sheet(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no datasets.xlsx"):
        csxa.load(tmp_path / "d")


def test_unknown_column_layout(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    write_sheet(root / "datasets.xlsx", [(1, 0, 35)], header=["Number", "Sex", "Years"])
    with pytest.raises(DataError, match="no column starting with 'Gender'"):
        csxa.load(root)


def test_header_on_first_row_also_found(tmp_path):
    from tests.conftest import make_mini_csxa

    root = make_mini_csxa(tmp_path / "d", [(1, 0, 35, 1), (2, 1, 40, 2)])
    write_sheet(root / "datasets.xlsx", [(1, 0, 35, 1, 1, 1.0), (2, 1, 40, 2, 1, 1.0)], super_header=False)
    samples, _ = csxa.load(root)
    assert len(samples) == 2


def _build(data, out, *more: str) -> int:
    return main(["--quiet", "build-engine", "--task", "spondylosis", "--data", str(data), "--out", str(out), *more])


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = _build(tmp_path / "empty", tmp_path / "engines", "--epochs", "1")
    err = capsys.readouterr().err
    assert code == 2 and "no datasets.xlsx" in err and "Traceback" not in err


def test_cli_too_small_dataset(mini_csxa, tmp_path, capsys):
    code = _build(mini_csxa, tmp_path / "engines", "--epochs", "1", "--image-size", "32")
    err = capsys.readouterr().err
    assert code == 2 and "split" in err
