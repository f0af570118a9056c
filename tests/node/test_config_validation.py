"""Configuration validated at load: one test per bad value, each a readable error naming the key,
and `screener check-config` printing the same without a traceback (exit 2; 0 with a summary)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from screener import cli, config
from screener.errors import ConfigError

# (TOML text, the key the error must name). Each is one of the bad values the issue lists, or a
# sibling of one (every number has its range, every AE title the DICOM rules).
BAD = [
    ('[node]\nae_title = ""\n', "node.ae_title"),
    ('[node]\nae_title = "    "\n', "node.ae_title"),
    ('[node]\nae_title = "CSPINÉ"\n', "node.ae_title"),
    ('[node]\nae_title = "CS\\\\PINE"\n', "node.ae_title"),
    ('[node]\nae_title = "CS\\tPINE"\n', "node.ae_title"),
    ('[node]\nae_title = "SEVENTEEN_CHARS_X"\n', "node.ae_title"),
    ('[node]\nallowed_calling_aets = ["PACS", "A_CALLING_AE_TITLE_TOO_LONG"]\n', "node.allowed_calling_aets[1]"),
    ('[node]\nallowed_calling_aets = [""]\n', "node.allowed_calling_aets[0]"),
    ('[node]\nallowed_calling_aets = ["BACK\\\\SLASH"]\n', "node.allowed_calling_aets[0]"),
    ("[node]\nacse_timeout_s = 0\n", "node.acse_timeout_s"),
    ("[node]\nacse_timeout_s = -1\n", "node.acse_timeout_s"),
    ("[node]\ndimse_timeout_s = nan\n", "node.dimse_timeout_s"),
    ("[node]\nnetwork_timeout_s = inf\n", "node.network_timeout_s"),
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nport = -1\n", "node.port"),
    ("[node]\nmax_associations = 0\n", "node.max_associations"),
    ("[node]\nmax_associations_per_address = 0\n", "node.max_associations_per_address"),
    ("[node]\nmin_free_mb = -5\n", "node.min_free_mb"),
    ("[schedule]\nsend_backoff_s = -1\n", "schedule.send_backoff_s"),
    ("[schedule]\nsend_backoff_s = 0\n", "schedule.send_backoff_s"),
    ("[schedule]\nstudy_stable_s = inf\n", "schedule.study_stable_s"),
    ("[schedule]\nstudy_stable_s = nan\n", "schedule.study_stable_s"),
    ("[schedule]\nstudy_stable_s = -1\n", "schedule.study_stable_s"),
    ("[schedule]\nsend_retries = -1\n", "schedule.send_retries"),
    ("[schedule]\nretention_days = -1\n", "schedule.retention_days"),
    ("[schedule]\nbatch_interval_s = 0\n", "schedule.batch_interval_s"),
    ("[schedule]\nbatch_max_size = 0\n", "schedule.batch_max_size"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 99999\n', "destinations[0].port"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 0\n', "destinations[0].port"),
    ('[[destinations]]\nae_title = ""\nhost = "10.0.0.5"\nport = 104\n', "destinations[0].ae_title"),
    ('[[destinations]]\nae_title = "PACS"\nhost = ""\nport = 104\n', "destinations[0].host"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\ntls = true\n', "destinations[0].tls"),
    ('[engines]\nenabled = ["spondylosis"]\n[[routing]]\nname = "x"\nengines = ["stenosis"]\n', "routing[0].engines"),
    ('[[routing]]\nname = "x"\nengines = []\n', "routing[0].engines"),
    ("[tls]\nlisten = true\n", "tls.certificate"),
    ('[tls]\nlisten = true\ncertificate = "c.pem"\nprivate_key = "k.pem"\n', "tls.ca_file"),
    ("[tls]\nport = 65536\n", "tls.port"),
    ('[[tls.peers]]\nae_title = "PACS"\n', "tls.peers[0]"),
    ("[engines]\ncpu_sessions = -1\n", "engines.cpu_sessions"),
    ('[engines]\ncpu_sessions = "2"\n', "engines.cpu_sessions"),
    ("[pipeline]\nnice = 20\n", "pipeline.nice"),
    ("[pipeline]\nnice = -1\n", "pipeline.nice"),
]


@pytest.mark.parametrize(("text", "key"), BAD, ids=[k + ":" + t.split("\n")[-2][:24] for t, k in BAD])
def test_bad_value_named(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        config.load(p)
    message = str(err.value)
    assert message.startswith(f"{p}: {key}"), message
    assert "Traceback" not in message


def test_check_config_prints_the_error_without_traceback(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text("[schedule]\nsend_backoff_s = -1\n")
    assert cli.main(["check-config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "schedule.send_backoff_s" in err and "Traceback" not in err
    assert err.startswith("screener: error:")


def test_check_config_summary(tmp_path, capsys):
    engines = tmp_path / "engines"
    p = tmp_path / "c.toml"
    p.write_text(f'[node]\nvar_dir = "{tmp_path / "var"}"\n[engines]\ndir = "{engines}"\nenabled = ["spondylosis"]\n')
    # an enabled engine that is not there: serve would refuse, so check-config says so
    assert cli.main(["check-config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "engines.enabled" in err and "spondylosis" in err and "Traceback" not in err
    (engines / "spondylosis").mkdir(parents=True)
    (engines / "spondylosis" / "manifest.json").write_text("{}")
    assert cli.main(["check-config", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "CSPINE" in out and "spondylosis" in out


def test_var_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "var"
    blocker.write_text("not a folder")
    p = tmp_path / "c.toml"
    p.write_text(f'[node]\nvar_dir = "{blocker}"\n')
    settings = config.load(p)
    with pytest.raises(ConfigError, match=r"node.var_dir: .*exists and is not a folder"):
        config.check_environment(settings)
    assert cli.main(["check-config", "--config", str(p)]) == 2
    assert "node.var_dir" in capsys.readouterr().err
    # serve says the same instead of raising NotADirectoryError
    assert cli.main(["serve", "--config", str(p)]) == 2
    assert "node.var_dir" in capsys.readouterr().err


def test_var_dir_below_a_file_and_sr_folder_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    s = config.Settings(node=config.NodeSettings(var_dir=str(tmp_path / "file" / "var")))
    with pytest.raises(ConfigError, match="node.var_dir: .*cannot be created"):
        config.check_environment(s)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("running as root")
        s = config.Settings(node=config.NodeSettings(var_dir=str(tmp_path / "v")), sr_folder=str(ro / "sr"))
        with pytest.raises(ConfigError, match="sr_folder: .*not writable"):
            config.check_environment(s)
    finally:
        ro.chmod(0o700)


def test_good_values_accepted(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        '[node]\nae_title = "  CSPINE "\nallowed_calling_aets = ["ORTHANC", "A-B_C.D 1"]\nport = 104\n'
        "[schedule]\nstudy_stable_s = 0\nsend_retries = 0\nretention_days = 0\n"
        "[engines]\ncpu_sessions = 2\n[pipeline]\nnice = 0\n"
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs.example.org"\nport = 65535\n'
    )
    s = config.load(p)
    assert s.node.port == 104 and s.destinations[0].port == 65535 and math.isfinite(s.schedule.study_stable_s)
    assert s.engines.cpu_sessions == 2 and s.pipeline.nice == 0


def test_destination_string_forms():
    d = config.parse_destination("PACS@10.0.0.5:2762?tls")
    assert d == config.Destination("PACS", "10.0.0.5", 2762, tls=True) and str(d) == "PACS@10.0.0.5:2762?tls"
    assert str(config.parse_destination("PACS@h:104")) == "PACS@h:104"
    with pytest.raises(ConfigError, match="port"):
        config.parse_destination("PACS@h:99999")
    with pytest.raises(ConfigError, match="ae_title"):
        config.parse_destination("TOO_LONG_AE_TITLE_X@h:104")


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="node.ae_title"):
        config.with_overrides(config.Settings(), ae_title="BAD\\AET")


def test_repo_config_and_example_pass_check_environment(tmp_path):
    root = Path(__file__).resolve().parents[2]
    s = config.load(root / "config.toml")
    config.check_environment(config.with_overrides(s, var_dir=str(tmp_path / "var")))
