"""Command-line behaviour: clear messages, no tracebacks for user mistakes."""

import pytest

from screener.cli import main


def test_serve_refuses_missing_engine(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[engines]\ndir = "{tmp_path / "engines"}"\nenabled = ["spondylosis"]\n'
        f'[node]\nvar_dir = "{tmp_path / "var"}"\nport = 0\n'
    )
    code = main(["serve", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert "spondylosis" in err and "manifest.json" in err and "Traceback" not in err


def test_bad_config_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = 'x'\n")
    assert main(["status", "--config", str(cfg)]) == 2
    assert "node.port" in capsys.readouterr().err


def test_bad_destination(tmp_path, capsys):
    assert main(["serve", "--config", "config.toml", "--destination", "nonsense"]) == 2
    assert "AET@HOST:PORT" in capsys.readouterr().err


def test_status_without_state(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[engines]\ndir = "{tmp_path / "engines"}"\n[node]\nvar_dir = "{tmp_path / "var"}"\n')
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "no node state" in out and "NOT LOADABLE" in out


@pytest.mark.slow  # builds the session engine
def test_tampered_engine_refused(tmp_path, capsys, built):
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(built[1], engines / "spondylosis")
    with open(engines / "spondylosis" / "model.onnx", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[engines]\ndir = "{engines}"\nbackend = "onnx-fp32"\n[node]\nvar_dir = "{tmp_path / "var"}"\nport = 0\n'
    )
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_complete_names_an_unknown_study(tmp_path, capsys):
    from screener.store import Store

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[engines]\ndir = "{tmp_path / "engines"}"\n[node]\nvar_dir = "{tmp_path / "var"}"\n')
    Store.open(tmp_path / "var").close()
    assert main(["complete", "--config", str(cfg), "1.2.3.4"]) == 1
    assert "1.2.3.4: unknown study" in capsys.readouterr().out
