"""Without the trainer extra, `trainer` names the extra to install: exit 2, no traceback."""

import builtins

import pytest

from trainer import cli


def test_missing_extra_is_a_message_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_extra", lambda: ["torch", "torchvision"])
    assert cli.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'cspine-screener[trainer]'" in err
    assert "torch, torchvision" in err
    assert "Traceback" not in err


def test_extra_module_failing_at_import_is_the_same_message(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_openpyxl(name, *args, **kwargs):
        if name.split(".")[0] == "openpyxl":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openpyxl)
    assert cli.main(["--quiet", "synth", "--out", str(tmp_path / "s"), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "missing: openpyxl" in err and "cspine-screener[trainer]" in err


def test_other_import_errors_are_not_hidden(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'nosuchmodule'", name="nosuchmodule")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["--quiet", "synth", "--out", "x"])
