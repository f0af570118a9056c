"""Credentials for the page's actions, and CSRF tokens.

The administrator configures, in ``[http]``, a bearer token (for scripts: ``Authorization: Bearer``)
and/or HTTP basic auth (for a browser), each as a PBKDF2 hash or as a file that holds the secret
(mode 0600, like a systemd credential or a Docker secret). No secret in plain text in config.toml.
A hash line comes from::

    python -m screener.http.auth            # asks for the secret twice, prints pbkdf2_sha256$...

Without credentials the web side is read-only. Forms posted by a browser signed in with basic auth
carry a CSRF token: an HMAC of a random per-browser session cookie (HttpOnly, SameSite=Strict)
under a per-process key; a request from another site has neither the cookie nor the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from screener.config import HttpSettings
from screener.errors import ConfigError
from screener.logs import get_logger

log = get_logger(__name__)

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
SESSION_COOKIE = "screener_session"
REALM = "cspine-screener"


def hash_secret(secret: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>`` of `secret`."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${salt.hex()}${digest.hex()}"


def parse_hash(encoded: str, key: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a hash line; ConfigError naming `key` if malformed."""
    parts = encoded.strip().split("$")
    try:
        if len(parts) != 4 or parts[0] != SCHEME:
            raise ValueError
        iterations = int(parts[1])
        salt, digest = bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
        if iterations < 1 or not salt or len(digest) != 32:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{key}: expected '{SCHEME}$<iterations>$<salt hex>$<hash hex>' (make one with "
            "`python -m screener.http.auth`)"
        ) from None
    return iterations, salt, digest


def verify_hash(secret: str, encoded: str) -> bool:
    iterations, salt, digest = parse_hash(encoded, "hash")
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, iterations), digest)


def _read_secret_file(path: str, key: str, base: Path | None) -> str:
    p = Path(path)
    if base is not None and not p.is_absolute():
        p = base / p
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {p}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"{key}: {p} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret_file_readable_by_others", key=key, path=str(p), hint="chmod 600")
    return text


@dataclass(frozen=True)
class _Secret:
    """One secret, known either by its hash or by its value (read from a file)."""

    hash: str = ""
    value: str = ""

    def matches(self, presented: str) -> bool:
        if self.value:
            return hmac.compare_digest(presented.encode("utf-8"), self.value.encode("utf-8"))
        if self.hash:
            return verify_hash(presented, self.hash)
        return False


@dataclass(frozen=True)
class Principal:
    """Who made an authenticated request: ``method`` is 'bearer' or 'basic'."""

    name: str
    method: str


class Authenticator:
    """Checks ``Authorization`` headers against the configured credentials.

    A PBKDF2 check costs a fraction of a second on purpose; successful checks are remembered (by a
    SHA-256 of the header, bounded) so that a signed-in browser does not pay it on every page, and
    checks run one at a time so that a flood of wrong passwords uses one core at most."""

    def __init__(self, token: _Secret | None = None, user: str = "", password: _Secret | None = None) -> None:
        self.token = token
        self.user = user
        self.password = password
        self._ok: OrderedDict[str, Principal] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, http: HttpSettings, base: Path | None = None) -> Authenticator:
        token = password = None
        if http.token_hash:
            parse_hash(http.token_hash, "http.token_hash")
            token = _Secret(hash=http.token_hash)
        elif http.token_file:
            token = _Secret(value=_read_secret_file(http.token_file, "http.token_file", base))
        if http.basic_password_hash:
            parse_hash(http.basic_password_hash, "http.basic_password_hash")
            password = _Secret(hash=http.basic_password_hash)
        elif http.basic_password_file:
            password = _Secret(value=_read_secret_file(http.basic_password_file, "http.basic_password_file", base))
        return cls(token, http.basic_user, password)

    @property
    def enabled(self) -> bool:
        """True when some credential is configured (otherwise the web side is read-only)."""
        return self.token is not None or self.password is not None

    @property
    def basic_enabled(self) -> bool:
        return bool(self.user) and self.password is not None

    def authenticate(self, headers: Mapping[str, str]) -> Principal | None:
        header = headers.get("authorization", "")
        if not header or not self.enabled:
            return None
        key = hashlib.sha256(header.encode("utf-8", "replace")).hexdigest()
        with self._lock:
            hit = self._ok.get(key)
            if hit is not None:
                self._ok.move_to_end(key)
                return hit
            principal = self._check(header)
            if principal is not None:
                self._ok[key] = principal
                while len(self._ok) > 64:
                    self._ok.popitem(last=False)
        if principal is None:
            log.warning("http_auth_failed", scheme=header.split(" ", 1)[0][:10])
        return principal

    def _check(self, header: str) -> Principal | None:
        scheme, _, value = header.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token is not None and value:
            return Principal("token", "bearer") if self.token.matches(value) else None
        if scheme == "basic" and self.basic_enabled and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            ok_user = hmac.compare_digest(user.encode("utf-8"), self.user.encode("utf-8"))
            assert self.password is not None
            ok_password = bool(sep) and self.password.matches(password)
            return Principal(self.user, "basic") if ok_user and ok_password else None
        return None


class Csrf:
    """Per-browser session cookie + HMAC token under a per-process key (restarts void old forms)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or os.urandom(32)

    @staticmethod
    def new_session() -> str:
        return secrets.token_hex(16)

    def token(self, session: str, principal: Principal) -> str:
        msg = f"{session}|{principal.name}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def valid(self, session: str | None, principal: Principal, token: str | None) -> bool:
        if not session or not token or len(session) != 32:
            return False
        return hmac.compare_digest(self.token(session, principal), token)


def main() -> int:
    """Print a hash line for config.toml ([http] token_hash or basic_password_hash)."""
    import getpass
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--generate-token":
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the scripts that call the node): {token}")
        print(f'token_hash = "{hash_secret(token)}"')
        return 0
    first = getpass.getpass("secret: ")
    if not first or getpass.getpass("again: ") != first:
        print("error: empty, or the two entries differ", file=sys.stderr)
        return 2
    print(hash_secret(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
