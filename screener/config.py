"""Typed settings read from config.toml.

Every section is a frozen dataclass. Unknown keys and wrong types are rejected
with a `ConfigError` naming the key (``node.port: expected int, got str``).
Command-line overrides are applied with `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from screener.errors import ConfigError


class _Invalid(ConfigError):
    """A value out of its range, raised from a section's __post_init__. `_build` re-prefixes it with
    the key path as written in the file (``destinations[2].port``); built directly, `section` is used."""

    def __init__(self, section: str, key: str, message: str) -> None:
        super().__init__(f"{section}.{key}: {message}")
        self.key = key
        self.message = message


def ae_title_problem(value: str) -> str:
    """Why `value` is not a valid DICOM AE title (PS3.5 VR AE), or '' when it is: 1 to 16 characters
    of the default repertoire (printable ASCII), no backslash, no control characters, not all spaces."""
    if not value.strip(" "):
        return "must not be empty or all spaces"
    if len(value) > 16:
        return f"{len(value)} characters, at most 16 are allowed"
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in value):
        return "only printable ASCII characters are allowed (no control or non-ASCII characters)"
    if "\\" in value:
        return "a backslash is not allowed"
    return ""


def _check_aet(section: str, key: str, value: str) -> None:
    problem = ae_title_problem(value)
    if problem:
        raise _Invalid(section, key, f"{value!r} is not a valid AE title: {problem}")


def _check_number(
    section: str, key: str, value: float, *, minimum: float, above: bool = False, maximum: float | None = None
) -> None:
    """`value` must be finite and >= minimum (> minimum when `above`), and <= maximum if given."""
    if not math.isfinite(value):
        raise _Invalid(section, key, f"{value} is not a finite number")
    low_ok = value > minimum if above else value >= minimum
    if not low_ok:
        raise _Invalid(section, key, f"{value} must be {'greater than' if above else 'at least'} {minimum:g}")
    if maximum is not None and value > maximum:
        raise _Invalid(section, key, f"{value} must be at most {maximum:g}")


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

    # Concurrent connections from one source address (protects the other peers' slots); a value
    # above max_associations means max_associations.
    max_associations_per_address: int = 5

    def __post_init__(self) -> None:
        _check_aet("node", "ae_title", self.ae_title)
        # 0: an OS-assigned free port (tests); a service uses a fixed one.
        _check_number("node", "port", self.port, minimum=0, maximum=65535)
        _check_number("node", "max_associations", self.max_associations, minimum=1)
        _check_number("node", "max_associations_per_address", self.max_associations_per_address, minimum=1)
        for i, aet in enumerate(self.allowed_calling_aets):
            _check_aet("node", f"allowed_calling_aets[{i}]", aet)
        if not self.var_dir.strip():
            raise _Invalid("node", "var_dir", "must not be empty")
        _check_number("node", "min_free_mb", self.min_free_mb, minimum=0)
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            _check_number("node", key, getattr(self, key), minimum=0, above=True, maximum=86400)


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
        _check_number("schedule", "study_stable_s", self.study_stable_s, minimum=0, maximum=7 * 86400)
        _check_number("schedule", "batch_max_size", self.batch_max_size, minimum=1)
        _check_number("schedule", "batch_interval_s", self.batch_interval_s, minimum=0, above=True, maximum=86400)
        _check_number("schedule", "send_retries", self.send_retries, minimum=0)
        _check_number("schedule", "send_backoff_s", self.send_backoff_s, minimum=0, above=True, maximum=86400)
        _check_number("schedule", "retention_days", self.retention_days, minimum=0)
        _check_number("schedule", "screen_attempts", self.screen_attempts, minimum=1)
        _check_number("schedule", "screen_retry_s", self.screen_retry_s, minimum=0, maximum=86400)
        _check_number("schedule", "retention_interval_s", self.retention_interval_s, minimum=0, above=True)
        _check_number("schedule", "stop_timeout_s", self.stop_timeout_s, minimum=0, above=True, maximum=86400)


@dataclass(frozen=True)
class EngineSettings:
    dir: str = "engines"
    backend: str = "auto"  # auto | tensorrt | torch | onnx-int8 | onnx-fp32
    enabled: list[str] = field(default_factory=lambda: ["spondylosis"])
    # ONNX Runtime on the CPU: sessions per engine that share each batch (0: one per CPU, at most 4; each
    # holds its own copy of the weights). 1: one session with a thread per CPU.
    cpu_sessions: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "tensorrt", "torch", "onnx-int8", "onnx-fp32"):
            raise ConfigError(
                f"engines.backend: expected auto|tensorrt|torch|onnx-int8|onnx-fp32, got {self.backend!r}"
            )
        if isinstance(self.cpu_sessions, bool) or not isinstance(self.cpu_sessions, int) or self.cpu_sessions < 0:
            raise ConfigError("engines.cpu_sessions: a whole number, 0 (one per CPU, at most 4) or more")


def _available_cpus() -> int:
    try:
        import os

        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return 1


@dataclass(frozen=True)
class PipelineSettings:
    """The decode worker pool (screener.pipeline): isolated processes that read, decode and
    preprocess images; each with an address-space limit and a per-image time limit."""

    workers: int = 0  # 0: one per CPU this process may use (os.sched_getaffinity)
    memory_limit_mb: int = 3072  # RLIMIT_AS of each worker; 0: no limit
    image_timeout_s: float = 60.0  # a worker still busy with one image after this is killed
    prefetch_batches: int = 2  # batches decoded ahead of the engines
    nice: int = 10  # niceness of the decode workers and the engines' CPU threads (receiving images goes first)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError("pipeline.workers: must be 0 (one per CPU) or more")
        if self.memory_limit_mb and self.memory_limit_mb < 256:
            raise ConfigError("pipeline.memory_limit_mb: at least 256 (or 0 for no limit)")
        if self.image_timeout_s <= 0:
            raise ConfigError("pipeline.image_timeout_s: must be positive")
        if self.prefetch_batches < 1:
            raise ConfigError("pipeline.prefetch_batches: must be at least 1")
        if not 0 <= self.nice <= 19:
            raise ConfigError("pipeline.nice: 0 (same priority as receiving) to 19 (lowest)")

    @property
    def worker_count(self) -> int:
        return self.workers or _available_cpus()


@dataclass(frozen=True)
class LimitSettings:
    """What a received image may declare before the node decodes it (checked from the header).

    The defaults fit radiographs: CR and DX images are one frame (their IODs have no multi-frame
    module), monochrome (colour is accepted for secondary exports: 3 samples of 8 bits), at most
    16 bits allocated and, at 0.1 mm per pixel, 8192 px cover 82 cm. `max_dataset_mb` bounds the
    size of a data set as stored and, for Deflated transfer syntax, as inflated (while receiving
    and while reading); it must hold the largest allowed native image (8192 x 8192 x 2 bytes
    = 128 MiB)."""

    max_rows: int = 8192
    max_columns: int = 8192
    max_frames: int = 1
    max_samples_per_pixel: int = 3
    max_bits_allocated: int = 16
    max_dataset_mb: int = 256

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_columns", "max_frames", "max_dataset_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name}: must be at least 1")
        if self.max_rows > 65535 or self.max_columns > 65535:
            raise ConfigError("limits.max_rows/max_columns: at most 65535 (the US value range of Rows/Columns)")
        if self.max_samples_per_pixel not in (1, 3):
            raise ConfigError("limits.max_samples_per_pixel: expected 1 (monochrome only) or 3 (colour too)")
        if self.max_bits_allocated not in (8, 16, 32):
            raise ConfigError("limits.max_bits_allocated: expected 8, 16 or 32")
        if self.max_pixel_bytes > self.max_dataset_bytes:
            raise ConfigError(
                "limits.max_dataset_mb: smaller than the largest image the other limits allow "
                f"({-(-self.max_pixel_bytes // (1 << 20))} MB)"
            )

    @property
    def max_dataset_bytes(self) -> int:
        return self.max_dataset_mb << 20

    @property
    def max_pixel_bytes(self) -> int:
        """Native pixel data of the largest image the limits allow (one byte per 8-bit colour sample)."""
        largest_mono = self.max_rows * self.max_columns * (self.max_bits_allocated // 8)
        largest_colour = (
            self.max_rows * self.max_columns * self.max_samples_per_pixel if self.max_samples_per_pixel > 1 else 0
        )
        return max(largest_mono, largest_colour) * self.max_frames


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    # DICOM TLS to this destination (uses the [tls] certificate, key and CA files).
    tls: bool = False

    def __post_init__(self) -> None:
        _check_aet("destinations", "ae_title", self.ae_title)
        if not self.host.strip() or any(ch.isspace() or ch in "@/?" for ch in self.host):
            raise _Invalid("destinations", "host", f"{self.host!r} is not a host name or address")
        _check_number("destinations", "port", self.port, minimum=1, maximum=65535)

    def __str__(self) -> str:
        """The ``AET@HOST:PORT[?tls]`` form (command line, outbox)."""
        return f"{self.ae_title}@{self.host}:{self.port}{'?tls' if self.tls else ''}"


@dataclass(frozen=True)
class TlsPeer:
    """A TLS client allowed to call as `ae_title`: its certificate must have this subject common name
    and/or this SHA-256 fingerprint (hex, colons optional). Both given: both must match."""

    ae_title: str
    subject_cn: str = ""
    fingerprint_sha256: str = ""

    def __post_init__(self) -> None:
        _check_aet("tls.peers", "ae_title", self.ae_title)
        if not self.subject_cn and not self.fingerprint_sha256:
            raise _Invalid("tls.peers", "subject_cn", "give subject_cn and/or fingerprint_sha256")
        fp = self.fingerprint_sha256.replace(":", "").lower()
        if fp and (len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp)):
            raise _Invalid("tls.peers", "fingerprint_sha256", "expected 64 hex digits (colons optional)")


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 BCP 195: TLS 1.2 or later, ECDHE with AES-GCM or ChaCha20 only).

    The same certificate, key and CA files serve the TLS listener and TLS destinations."""

    certificate: str = ""  # PEM: our certificate (then any intermediates)
    private_key: str = ""  # PEM: its private key (unencrypted; file mode 0600, owned by the service user)
    ca_file: str = ""  # PEM: the CA certificate(s) that sign our peers' certificates
    listen: bool = False  # run a TLS listener on `port`
    port: int = 2762  # IANA "dicom-tls"
    plain_listener: bool = True  # keep the plain listener on node.port as well
    require_client_certificate: bool = True  # mutual authentication on the TLS listener
    verify_hostname: bool = True  # a destination's certificate must name the host we connect to
    # Empty: any client with a certificate signed by ca_file (and an allowed calling AE). Otherwise a
    # TLS caller must present the certificate listed for its calling AE title.
    peers: list[TlsPeer] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_number("tls", "port", self.port, minimum=0, maximum=65535)
        if self.listen and not (self.certificate and self.private_key):
            raise _Invalid("tls", "certificate", "the TLS listener needs tls.certificate and tls.private_key")
        if self.listen and self.require_client_certificate and not self.ca_file:
            raise _Invalid("tls", "ca_file", "require_client_certificate needs the CA file that signs the peers")
        if self.peers and not (self.listen and self.require_client_certificate):
            raise _Invalid("tls", "peers", "needs listen = true and require_client_certificate = true")
        if bool(self.certificate) != bool(self.private_key):
            raise _Invalid("tls", "private_key", "give both tls.certificate and tls.private_key, or neither")


@dataclass(frozen=True)
class RoutingRule:
    """Engines to run on an image whose DICOM attributes match every given pattern.

    ``view_code``: code values (SNOMED CT) of the first View Code Sequence (0054,0220) item.
    ``description_pattern``: regular expressions (case-insensitive, searched) of which one must
    match the Series Description or the Protocol Name. ``side``: "L" or "R" forces the side of
    the view; "" takes it from the view (View Position term, View Code, Image Laterality), see
    `screener.routing`. ``mirror`` (older configurations): side "R" when the view gives none."""

    name: str
    engines: list[str]
    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    view_position: list[str] = field(default_factory=list)
    laterality: list[str] = field(default_factory=list)
    series_description_contains: list[str] = field(default_factory=list)
    view_code: list[str] = field(default_factory=list)
    description_pattern: list[str] = field(default_factory=list)
    side: str = ""
    mirror: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise _Invalid("routing", "name", "must not be empty")
        if not self.engines:
            raise _Invalid("routing", "engines", "name at least one engine")
        if self.side.upper() not in ("", "L", "R"):
            raise ConfigError(f"routing {self.name!r}: side must be 'L', 'R' or '' (from the view)")
        for pattern in self.description_pattern:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"routing {self.name!r}: description_pattern {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class ReportSettings:
    # Optional objects for viewers that cannot render SR, per screened image, in addition to the SR:
    # none | secondary-capture (burned-in box and text) | gsps (a presentation state that draws them).
    companion: str = "none"

    def __post_init__(self) -> None:
        if self.companion not in ("none", "secondary-capture", "gsps"):
            raise ConfigError(f"report.companion: expected none|secondary-capture|gsps, got {self.companion!r}")


@dataclass(frozen=True)
class HttpSettings:
    """The node's HTTP side (screener.http): health checks, Prometheus metrics, the status page.

    Actions that change state (resend, complete) need credentials: a bearer token and/or HTTP basic
    auth, each given as a hash (``python -m screener.http.auth``) or as a file holding the secret
    (mode 0600). With none configured the page is read-only."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    token_hash: str = ""
    token_file: str = ""
    basic_user: str = ""
    basic_password_hash: str = ""
    basic_password_file: str = ""
    # Patient name, ID and birth date on the study page, for an authenticated user only.
    show_patient_data: bool = False
    echo_interval_s: float = 60.0
    echo_timeout_s: float = 5.0
    # /readyz fails while a destination does not answer C-ECHO (set false behind a load balancer
    # shared by several nodes that send to the same PACS).
    ready_requires_destinations: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port: {self.port} is not a TCP port")
        if self.echo_interval_s <= 0 or self.echo_timeout_s <= 0:
            raise ConfigError("http.echo_interval_s and http.echo_timeout_s: must be positive")
        if bool(self.basic_user) != bool(self.basic_password_hash or self.basic_password_file):
            raise ConfigError("http.basic_user: give both a user and basic_password_hash or basic_password_file")
        if self.basic_password_hash and self.basic_password_file:
            raise ConfigError("http.basic_password_hash and http.basic_password_file: give one, not both")
        if self.token_hash and self.token_file:
            raise ConfigError("http.token_hash and http.token_file: give one, not both")
        for key in ("token_hash", "basic_password_hash"):
            value = getattr(self, key)
            if value and not re.fullmatch(r"pbkdf2_sha256\$[0-9]+\$[0-9a-f]+\$[0-9a-f]{64}", value):
                raise ConfigError(
                    f"http.{key}: expected pbkdf2_sha256$<iterations>$<salt>$<hash> "
                    "(make one with `python -m screener.http.auth`)"
                )


# SNOMED CT view codes (DICOM CID 4010 "DX View"; SNOMED CT projection qualifier values).
VIEW_CODES_LATERAL = ["399067008", "399173006", "399198007"]  # lateral, left lateral, right lateral
VIEW_CODES_OBLIQUE = ["260421001", "260424009", "399184004", "399236003"]  # LLO, RLO, left/right oblique
_SIDE = r"(L|LT|LEFT)"
_RSIDE = r"(R|RT|RIGHT)"


def default_routing() -> list[RoutingRule]:
    """The built-in rules (used when config.toml has no [[routing]]; config.toml lists the same).

    In order: View Position's defined terms (PS3.3 C.8.11.5 / C.8.11.7: LL, RL lateral; LLO, RLO
    obliques; LAO, LPO, RAO, RPO kept as aliases), then View Code Sequence codes when View Position
    is empty, then Series Description / Protocol Name patterns when both are empty."""
    cr_dx = ["CR", "DX"]
    return [
        RoutingRule("lateral", ["spondylosis"], modality=cr_dx, view_position=["LL", "RL", "LATERAL", "LAT"]),
        RoutingRule(
            "oblique", ["roi", "stenosis"], modality=cr_dx, view_position=["LLO", "RLO", "LAO", "LPO", "RAO", "RPO"]
        ),
        RoutingRule(
            "lateral-by-view-code", ["spondylosis"], modality=cr_dx, view_position=[""], view_code=VIEW_CODES_LATERAL
        ),
        RoutingRule(
            "oblique-by-view-code",
            ["roi", "stenosis"],
            modality=cr_dx,
            view_position=[""],
            view_code=VIEW_CODES_OBLIQUE,
        ),
        RoutingRule(
            "left-oblique-by-description",
            ["roi", "stenosis"],
            modality=cr_dx,
            view_position=[""],
            view_code=[""],
            description_pattern=[r"\b(LAO|LPO|LLO)\b", rf"\bOBL\w*\W+{_SIDE}\b", rf"\b{_SIDE}\W+(\w+\W+)?OBL"],
            side="L",
        ),
        RoutingRule(
            "right-oblique-by-description",
            ["roi", "stenosis"],
            modality=cr_dx,
            view_position=[""],
            view_code=[""],
            description_pattern=[r"\b(RAO|RPO|RLO)\b", rf"\bOBL\w*\W+{_RSIDE}\b", rf"\b{_RSIDE}\W+(\w+\W+)?OBL"],
            side="R",
        ),
        RoutingRule(
            "lateral-by-description",
            ["spondylosis"],
            modality=cr_dx,
            view_position=[""],
            view_code=[""],
            description_pattern=[r"^(?!.*OBL).*\bLAT(ERAL)?\b"],
        ),
    ]


@dataclass(frozen=True)
class Settings:
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    engines: EngineSettings = field(default_factory=EngineSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    destinations: list[Destination] = field(default_factory=list)
    routing: list[RoutingRule] = field(default_factory=default_routing)
    sr_folder: str = ""
    report: ReportSettings = field(default_factory=ReportSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)


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
        if isinstance(kwargs[key], str) and "\x00" in kwargs[key]:
            raise ConfigError(f"{full}: contains a NUL character")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required setting(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except _Invalid as exc:
        raise ConfigError(f"{prefix}.{exc.key}: {exc.message}" if prefix else str(exc)) from None


def parse(data: dict[str, Any]) -> Settings:
    """Build settings from an already-parsed TOML document, with the checks across sections."""
    settings: Settings = _build(Settings, data)
    if "routing" not in data:
        # The built-in rules serve the engines that are enabled; rules written in config.toml must
        # name enabled engines only (validate says so).
        enabled = set(settings.engines.enabled)
        rules = [r for r in settings.routing if set(r.engines) <= enabled]
        settings = dataclasses.replace(settings, routing=rules)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Checks that span sections (each section checks its own values when it is built)."""
    enabled = set(settings.engines.enabled)
    for i, rule in enumerate(settings.routing):
        for name in rule.engines:
            if name not in enabled:
                raise ConfigError(
                    f"routing[{i}].engines: engine {name!r} (rule {rule.name!r}) is not in engines.enabled "
                    f"({', '.join(sorted(enabled)) or 'none'})"
                )
    tls_dests = [i for i, d in enumerate(settings.destinations) if d.tls]
    if tls_dests and not settings.tls.ca_file:
        raise ConfigError(f"destinations[{tls_dests[0]}].tls: needs tls.ca_file (the CA that signs its certificate)")
    if settings.tls.listen and settings.tls.plain_listener and settings.tls.port == settings.node.port != 0:
        raise ConfigError(f"tls.port: {settings.tls.port} is also node.port; the two listeners need two ports")


def _folder_problem(path: Path) -> str:
    """Why the node could not create or write the folder `path`, or '' (no side effects)."""
    if path.exists():
        if not path.is_dir():
            return "exists and is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return "is not writable by this user"
        return ""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable by this user"
    return ""


def check_environment(settings: Settings) -> None:
    """What `screener serve` needs from the file system: var and SR folders creatable and writable,
    TLS files readable and usable. Raises ConfigError naming the key."""
    for key, value in (("node.var_dir", settings.node.var_dir), ("sr_folder", settings.sr_folder)):
        if value:
            problem = _folder_problem(Path(value))
            if problem:
                raise ConfigError(f"{key}: {value}: {problem}")
    tls = settings.tls
    for key in ("certificate", "private_key", "ca_file"):
        value = getattr(tls, key)
        if value and not os.access(value, os.R_OK):
            raise ConfigError(f"tls.{key}: {value}: {'not readable' if Path(value).exists() else 'no such file'}")
    if tls.listen or any(d.tls for d in settings.destinations):
        from screener.dicom.tls import client_context, server_context

        if tls.listen:
            server_context(tls)
        if any(d.tls for d in settings.destinations):
            client_context(tls)


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
    """Parse ``AET@HOST:PORT`` or ``AET@HOST:PORT?tls`` (the --destination command-line form)."""
    body, tls = (text[: -len("?tls")], True) if text.endswith("?tls") else (text, False)
    try:
        aet, rest = body.split("@", 1)
        host, port = rest.rsplit(":", 1)
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT or AET@HOST:PORT?tls") from None
    if not aet or not host:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT or AET@HOST:PORT?tls")
    try:
        return Destination(ae_title=aet, host=host, port=port_number, tls=tls)
    except _Invalid as exc:
        raise ConfigError(f"--destination {text!r}: {exc.key}: {exc.message}") from None


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """Apply command-line overrides; None values are ignored.

    Known keys: port, ae_title, var_dir, destinations (list[Destination]).
    """
    node_changes = {k: v for k in ("port", "ae_title", "var_dir") if (v := overrides.get(k)) is not None}
    node = dataclasses.replace(settings.node, **node_changes) if node_changes else settings.node
    destinations = overrides.get("destinations") or settings.destinations
    return dataclasses.replace(settings, node=node, destinations=list(destinations))
