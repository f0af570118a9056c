"""`trainer evaluate` and `trainer ablate` on the small session data set."""

import json

import pytest

from trainer.cli import main

pytestmark = pytest.mark.slow


def test_evaluate_audits_the_built_engine(built, tmp_path, capsys):
    opts, folder = built
    out = tmp_path / "audit"
    assert main(["--quiet", "evaluate", "--engine", str(folder), "--data", str(opts.data), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert rep["extra"]["same_data_as_build"] is True
    assert rep["threshold"]["threshold"] == manifest["threshold"]["value"]  # never re-tuned
    assert abs(rep["test"]["auroc"] - manifest["backends"][0]["test_auroc"]) < 1e-6
    assert (out / "report.md").is_file() and (out / "roc.png").is_file()


def test_ablate_table(built, tmp_path, capsys):
    opts, _ = built
    out = tmp_path / "ablation"
    assert (
        main(
            [
                "--quiet",
                "ablate",
                "--data",
                str(opts.data),
                "--out",
                str(out),
                "--conditions",
                "original",
                "wide_crop",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "McNemar p vs original" in table and "wide_crop" in table and "majority baseline" in table
    assert (out / "ablation.md").is_file()
    data = json.loads((out / "ablation.json").read_text())
    assert set(data) == {"original", "wide_crop"}


def test_ablate_unknown_condition(built, tmp_path, capsys):
    assert (
        main(["--quiet", "ablate", "--data", str(built[0].data), "--out", str(tmp_path), "--conditions", "sepia"]) == 2
    )
    assert "unknown recipe" in capsys.readouterr().err
