import pytest

from screener import config
from screener.errors import ConfigError


def test_repo_config_loads():
    s = config.load("config.toml")
    assert s.node.port == 11112 and s.node.ae_title == "CSPINE"


def test_unknown_key_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[node]\nprot = 1\n")
    with pytest.raises(ConfigError, match="node.prot: unknown setting"):
        config.load(p)


def test_wrong_type_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[node]\nport = "eleven"\n')
    with pytest.raises(ConfigError, match="node.port: expected an integer"):
        config.load(p)


def test_bool_is_not_int(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[schedule]\nbatch_max_size = true\n")
    with pytest.raises(ConfigError, match="schedule.batch_max_size"):
        config.load(p)


def test_list_items_checked(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[destinations]]\nae_title = "A"\nhost = "h"\nport = "x"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\].port"):
        config.load(p)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")
    p = tmp_path / "c.toml"
    p.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)


def test_overrides():
    s = config.with_overrides(
        config.Settings(), port=4000, ae_title="X", destinations=[config.parse_destination("PACS@127.0.0.1:4242")]
    )
    assert s.node.port == 4000 and s.node.ae_title == "X"
    assert s.destinations[0] == config.Destination("PACS", "127.0.0.1", 4242)
    with pytest.raises(ConfigError):
        config.parse_destination("nohost")
