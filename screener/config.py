"""Typed settings read from config.toml.

Every section is a frozen dataclass. Unknown keys and wrong types are rejected
with a `ConfigError` naming the key (``node.port: expected int, got str``).
Command-line overrides are applied with `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from screener.errors import ConfigError


@dataclass(frozen=True)
class LoggingSettings:
    renderer: str = "console"  # console | json
    level: str = "info"

    def __post_init__(self) -> None:
        if self.renderer not in ("console", "json"):
            raise ConfigError(f"logging.renderer: expected 'console' or 'json', got {self.renderer!r}")
        if self.level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"logging.level: expected debug|info|warning|error, got {self.level!r}")


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "CSPINE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    # Empty list: any calling AE title is accepted.
    allowed_calling_aets: list[str] = field(default_factory=list)
    # Empty list: any source address is accepted.
    allowed_addresses: list[str] = field(default_factory=list)
    var_dir: str = "var"
    min_free_mb: int = 1024
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ConfigError("node.ae_title: must be 1 to 16 characters")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"node.port: {self.port} is not a TCP port")
        if self.max_associations < 1:
            raise ConfigError("node.max_associations: must be at least 1")


@dataclass(frozen=True)
class ScheduleSettings:
    study_stable_s: float = 60.0
    batch_max_size: int = 32
    batch_interval_s: float = 5.0
    send_retries: int = 5
    send_backoff_s: float = 30.0
    retention_days: int = 30
    # State machine (docs/state-machine.md): a study whose screening did not finish this many times
    # (the process died or the job raised) is quarantined: failed, with the reason.
    screen_attempts: int = 3
    # Wait before screening a study again after an error of the node's environment (disk full).
    screen_retry_s: float = 30.0
    # Retention runs within 30 s of the start, then every retention_interval_s.
    retention_interval_s: float = 3600.0
    # Graceful stop (SIGTERM): the batch in flight gets this long; keep systemd's TimeoutStopSec above it.
    stop_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.batch_max_size < 1:
            raise ConfigError("schedule.batch_max_size: must be at least 1")
        if self.screen_attempts < 1:
            raise ConfigError("schedule.screen_attempts: must be at least 1")
        if self.stop_timeout_s <= 0 or self.retention_interval_s <= 0:
            raise ConfigError("schedule.stop_timeout_s and schedule.retention_interval_s: must be positive")


@dataclass(frozen=True)
class EngineSettings:
    dir: str = "engines"
    backend: str = "auto"  # auto | tensorrt | onnx-int8 | onnx-fp32
    enabled: list[str] = field(default_factory=lambda: ["spondylosis"])

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "tensorrt", "onnx-int8", "onnx-fp32"):
            raise ConfigError(f"engines.backend: expected auto|tensorrt|onnx-int8|onnx-fp32, got {self.backend!r}")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class RoutingRule:
    """Engines to run on an image whose DICOM attributes match every given pattern."""

    name: str
    engines: list[str]
    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    view_position: list[str] = field(default_factory=list)
    laterality: list[str] = field(default_factory=list)
    series_description_contains: list[str] = field(default_factory=list)
    mirror: bool = False


@dataclass(frozen=True)
class Settings:
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    engines: EngineSettings = field(default_factory=EngineSettings)
    destinations: list[Destination] = field(default_factory=list)
    routing: list[RoutingRule] = field(default_factory=list)
    sr_folder: str = ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}")


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown setting (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(value, hints[key], full)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required setting(s) {', '.join(missing)}")
    return cls(**kwargs)


def parse(data: dict[str, Any]) -> Settings:
    """Build settings from an already-parsed TOML document."""
    return _build(Settings, data)


def load(path: str | Path | None) -> Settings:
    """Read config.toml. `None` gives the defaults."""
    if path is None:
        return Settings()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def parse_destination(text: str) -> Destination:
    """Parse ``AET@HOST:PORT`` (the --destination command-line form)."""
    try:
        aet, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        dest = Destination(ae_title=aet, host=host, port=int(port))
    except ValueError:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT") from None
    if not aet or not host:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT")
    return dest


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """Apply command-line overrides; None values are ignored.

    Known keys: port, ae_title, var_dir, destinations (list[Destination]).
    """
    node_changes = {k: v for k in ("port", "ae_title", "var_dir") if (v := overrides.get(k)) is not None}
    node = dataclasses.replace(settings.node, **node_changes) if node_changes else settings.node
    destinations = overrides.get("destinations") or settings.destinations
    return dataclasses.replace(settings, node=node, destinations=list(destinations))
