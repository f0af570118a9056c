"""The HTTP side's parts: [http] settings, credentials, C-ECHO, the server's life with the node, demo data."""

from __future__ import annotations

import dataclasses
import os
import socket

import httpx2 as httpx
import pytest

from screener import config
from screener.errors import ConfigError, UserError
from screener.http.auth import Authenticator, Csrf, Principal, hash_secret, parse_hash, verify_hash
from screener.http.health import Echoer, destination_key, echo
from tests.support.node_helpers import CollectingSCP

# -- settings and credentials ------------------------------------------------------------------------


def test_http_settings_defaults_and_errors():
    s = config.parse({})
    assert s.http.enabled and s.http.host == "127.0.0.1" and not s.http.show_patient_data
    assert config.parse({"http": {"port": 0, "enabled": False}}).http.port == 0
    with pytest.raises(ConfigError, match="http.colour"):
        config.parse({"http": {"colour": "blue"}})
    with pytest.raises(ConfigError, match="http.port"):
        config.parse({"http": {"port": 70000}})
    with pytest.raises(ConfigError, match="basic_user"):
        config.parse({"http": {"basic_user": "admin"}})
    with pytest.raises(ConfigError, match="not both"):
        config.parse({"http": {"token_hash": "x", "token_file": "y"}})
    with pytest.raises(ConfigError, match="http.token_hash: expected pbkdf2_sha256"):
        config.parse({"http": {"token_hash": "secret-in-plain-text"}})
    assert config.parse({"http": {"token_hash": hash_secret("t", iterations=10)}}).http.token_hash


def test_hash_round_trip():
    line = hash_secret("pw", iterations=1000)
    assert line.startswith("pbkdf2_sha256$1000$")
    assert verify_hash("pw", line) and not verify_hash("pW", line)
    assert hash_secret("pw", iterations=1000) != line  # salted
    with pytest.raises(ConfigError, match="http.token_hash"):
        parse_hash("sha256$abc", "http.token_hash")
    with pytest.raises(ConfigError, match="http.basic_password_hash"):
        config.HttpSettings(basic_user="a", basic_password_hash="plaintext")


def test_secret_files(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    os.chmod(token, 0o600)
    pw = tmp_path / "pw"
    pw.write_text("hunter2")
    auth = Authenticator.from_settings(
        config.HttpSettings(token_file=str(token), basic_user="ops", basic_password_file=str(pw))
    )
    assert auth.enabled and auth.basic_enabled
    assert auth.authenticate({"authorization": "Bearer tok-123"}) == Principal("token", "bearer")
    assert auth.authenticate({"authorization": "Bearer tok-12"}) is None
    import base64

    good = "Basic " + base64.b64encode(b"ops:hunter2").decode()
    assert auth.authenticate({"authorization": good}) == Principal("ops", "basic")
    assert auth.authenticate({"authorization": "Basic " + base64.b64encode(b"ops:x").decode()}) is None
    assert auth.authenticate({"authorization": "Basic !!!"}) is None
    assert auth.authenticate({}) is None
    with pytest.raises(ConfigError, match="cannot read"):
        Authenticator.from_settings(config.HttpSettings(token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        Authenticator.from_settings(config.HttpSettings(token_file=str(tmp_path / "empty")))


def test_no_credentials_is_read_only():
    auth = Authenticator.from_settings(config.HttpSettings())
    assert not auth.enabled
    assert auth.authenticate({"authorization": "Bearer anything"}) is None


def test_csrf_tokens():
    csrf = Csrf(b"k" * 32)
    who = Principal("admin", "basic")
    sid = csrf.new_session()
    token = csrf.token(sid, who)
    assert csrf.valid(sid, who, token)
    assert not csrf.valid(csrf.new_session(), who, token)  # another browser
    assert not csrf.valid(sid, Principal("other", "basic"), token)
    assert not csrf.valid(sid, who, None) and not csrf.valid(None, who, token)
    assert not Csrf(b"j" * 32).valid(sid, who, token)  # another process (restart)


# -- C-ECHO --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_echo_real_peer_and_closed_port():
    scp = CollectingSCP().start()
    try:
        assert echo(scp.destination, "CSPINE", 5.0) == (True, "C-ECHO ok")
        ok, detail = echo(config.Destination("WRONG", "127.0.0.1", free_port()), "CSPINE", 2.0)
        assert not ok and "association" in detail
        echoer = Echoer([scp.destination], "CSPINE", interval_s=3600, timeout_s=5.0)
        results = echoer.check_now()
        assert results[destination_key(scp.destination)].ok
    finally:
        scp.stop()


# -- the server with the node ------------------------------------------------------------------------


def http_settings(tmp_path, port: int = 0) -> config.Settings:
    base = config.Settings()
    node = dataclasses.replace(base.node, port=0, host="127.0.0.1", var_dir=str(tmp_path / "var"), min_free_mb=1)
    engines = dataclasses.replace(base.engines, enabled=[])
    http = dataclasses.replace(base.http, port=port)
    return dataclasses.replace(base, node=node, engines=engines, http=http)


def test_node_starts_and_stops_http(tmp_path):
    from screener.node import Node

    node = Node(http_settings(tmp_path), engines={})
    node.start()
    try:
        assert node.http is not None and node.http.port > 0
        url = node.http.url
        assert url == f"http://127.0.0.1:{node.http.port}/"
        assert httpx.get(url + "healthz").json()["status"] == "ok"
        r = httpx.get(url + "readyz")
        assert r.status_code == 200, r.text
        assert "CSPINE" in httpx.get(url).text
    finally:
        node.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "healthz", timeout=2)


def test_http_port_in_use_is_a_clear_error(tmp_path):
    from screener.node import Node

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        node = Node(http_settings(tmp_path, port), engines={})
        try:
            with pytest.raises(UserError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
                node.start()
            assert node.listener is None  # the DICOM listener was stopped again
        finally:
            node.store.close()


def test_http_disabled(tmp_path):
    from screener.node import Node

    s = http_settings(tmp_path)
    node = Node(dataclasses.replace(s, http=dataclasses.replace(s.http, enabled=False)), engines={})
    node.start()
    try:
        assert node.http is None
    finally:
        node.stop()


# -- demo data -----------------------------------------------------------------------------------------


def test_demo_study_is_tagged_like_a_modality():
    from screener.dicom.image import header_attributes
    from screener.http.demo import demo_study
    from screener.routing import route

    images = demo_study()
    assert [ds.ViewPosition for ds in images] == ["LL", "LAO", "RAO"]
    assert [ds.get("ImageLaterality", "") for ds in images] == ["", "L", "R"]
    assert len({ds.StudyInstanceUID for ds in images}) == 1
    assert len({ds.SeriesInstanceUID for ds in images}) == 3
    for ds in images:
        assert ds.Modality == "DX" and ds.BitsStored == 12 and ds.pixel_array.max() > 0
    rules = config.load("config.toml").routing
    routes = [route(header_attributes(ds), rules) for ds in images]
    assert [(r.rule, r.laterality) for r in routes if r] == [
        ("lateral", ""),
        ("left-oblique", "L"),
        ("right-oblique", "R"),
    ]


def test_demo_without_a_node(tmp_path, capsys):
    from screener.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\nvar_dir = "{tmp_path / "var"}"\nport = {free_port()}\n')
    assert main(["demo", "--config", str(cfg), "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "make run" in err and "Traceback" not in err
