"""Typed, immutable settings: built-in defaults < settings file < environment < flags.

Every key is declared once in ``SCHEMA``; the dataclasses below are filled from it, so
a key cannot exist in one place and be missing in another.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

ENV_PREFIX = "AICHAT_"

# Well-known environment names and the key each one sets. The AICHAT_ form of the
# same key is more specific and wins when both are set.
WELL_KNOWN_ENV = {
    "PORT": ("server", "port"),
    "HOST": ("server", "host"),
    "OPENAI_API_KEY": ("ai", "api_key"),
    "OPENAI_BASE_URL": ("ai", "base_url"),
    "OPENAI_MODEL": ("ai", "model"),
    "MONGODB_URI": ("storage", "mongodb_uri"),
    "JWT_SECRET": ("auth", "jwt_secret"),
}

JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES384", "ES512", "EdDSA"}
)


class SettingsError(Exception):
    """A setting that cannot be used; the message names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"setting {key}: {problem}")
        self.key = key


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _text(raw: str) -> str:
    return raw.strip()


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"{raw.strip()!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"{value} must be at least {minimum}{upper}")
        return value

    return parse


def _seconds(minimum: float, *, exclusive: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"{raw.strip()!r} is not a number of seconds") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{raw.strip()!r} is not a finite number")
        if value < minimum or (exclusive and value == minimum):
            bound = "greater than" if exclusive else "at least"
            raise ValueError(f"{value:g} must be {bound} {minimum:g}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw.strip()!r} is not true or false")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"{raw.strip()!r} is not one of {', '.join(options)}")
        return value

    return parse


def _optional_integer(minimum: int) -> Callable[[str], int | None]:
    whole = _integer(minimum)

    def parse(raw: str) -> int | None:
        return whole(raw) if raw.strip() else None

    return parse


def _key_prefix(raw: str) -> str:
    value = raw.strip()
    if not value or not all(c.isalnum() or c in "_-.:" for c in value):
        raise ValueError(f"{value!r} must be non-empty letters, digits, '_', '-', '.' or ':'")
    return value


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _algorithms(raw: str) -> tuple[str, ...]:
    names = _comma_list(raw)
    if not names:
        raise ValueError("name at least one algorithm")
    unknown = [name for name in names if name not in JWT_ALGORITHMS]
    if unknown:
        raise ValueError(f"unsupported algorithm {unknown[0]!r} (use {', '.join(sorted(JWT_ALGORITHMS))})")
    return names


def _public_key_file(raw: str) -> str:
    """A readable PEM public key (checked now, so a bad key stops start-up, not every login)."""
    path = raw.strip()
    if path:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
        try:
            load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{path!r} is not a PEM public key") from None
    return path


# section -> key -> (default as written in settings.ini, parser)
SCHEMA: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "server": {
        "host": ("127.0.0.1", _text),
        "port": ("7000", _integer(0, 65535)),
        "cors_origins": ("", _comma_list),
        "trust_proxy_headers": ("false", _boolean),
        "max_body_bytes": ("65536", _integer(1)),
        "heartbeat_seconds": ("15", _seconds(0, exclusive=True)),
        "shutdown_grace_seconds": ("30", _seconds(0)),
        "idle_connection_timeout_seconds": ("75", _seconds(0, exclusive=True)),
        "body_timeout_seconds": ("30", _seconds(0, exclusive=True)),
        "socketio_ping_interval_seconds": ("25", _seconds(0, exclusive=True)),
        "socketio_ping_timeout_seconds": ("20", _seconds(0, exclusive=True)),
        "max_connections": ("0", _integer(0)),
        "allowed_hosts": ("", _comma_list),
        "web_ui": ("true", _boolean),
        "metrics": ("true", _boolean),
        "log_format": ("text", _choice("text", "json")),
    },
    "ai": {
        "provider": ("auto", _choice("auto", "openai", "demo")),
        "api_key": ("", _text),
        "base_url": ("", _text),
        "model": ("gpt-4o-mini", _text),
        "system_prompt": ("You are a helpful assistant.", _text),
        "max_history_messages": ("20", _integer(0)),
        "max_message_chars": ("8000", _integer(1)),
        "request_timeout_seconds": ("60", _seconds(0, exclusive=True)),
        "max_retries": ("2", _integer(0, 10)),
        "on_client_disconnect": ("finish", _choice("finish", "cancel")),
        "max_tokens": ("", _optional_integer(1)),
    },
    "storage": {
        "mongodb_uri": ("", _text),
        "mongodb_database": ("aichat", _text),
        "mongodb_driver": ("motor", _choice("motor", "pymongo")),
        "sqlite_path": ("data/chat.sqlite3", _text),
        "checkpoint_seconds": ("2", _seconds(0, exclusive=True)),
    },
    "auth": {
        "jwt_secret": ("", _text),
        "jwt_public_key_file": ("", _public_key_file),
        "jwt_algorithms": ("HS256", _algorithms),
        "jwt_audience": ("", _text),
        "jwt_issuer": ("", _text),
        "user_id_claim": ("sub", _text),
        "jwt_require_exp": ("true", _boolean),
    },
    "rate_limit": {
        "window_seconds": ("900", _seconds(0, exclusive=True)),
        "authenticated_limit": ("100", _integer(1)),
        "anonymous_limit": ("20", _integer(1)),
    },
    "cluster": {
        "redis_url": ("", _text),
        "key_prefix": ("aichat", _key_prefix),
        # empty: host:pid, filled in at load time
        "node_id": ("", _text),
        "lock_ttl_seconds": ("15", _seconds(1)),
    },
}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    cors_origins: tuple[str, ...]
    trust_proxy_headers: bool
    max_body_bytes: int
    heartbeat_seconds: float
    shutdown_grace_seconds: float
    idle_connection_timeout_seconds: float
    body_timeout_seconds: float
    socketio_ping_interval_seconds: float
    socketio_ping_timeout_seconds: float
    max_connections: int
    allowed_hosts: tuple[str, ...]
    web_ui: bool
    metrics: bool
    log_format: str


@dataclass(frozen=True, slots=True)
class AISettings:
    provider: str
    api_key: str = dataclasses.field(repr=False)
    base_url: str
    model: str
    system_prompt: str
    max_history_messages: int
    max_message_chars: int
    request_timeout_seconds: float
    max_retries: int
    on_client_disconnect: str
    max_tokens: int | None

    @property
    def resolved_provider(self) -> str:
        """`auto` means OpenAI when a key (or a custom endpoint) is configured, else the demo."""
        if self.provider != "auto":
            return self.provider
        return "openai" if self.api_key or self.base_url else "demo"


@dataclass(frozen=True, slots=True)
class StorageSettings:
    mongodb_uri: str = dataclasses.field(repr=False)
    mongodb_database: str
    mongodb_driver: str
    sqlite_path: str
    checkpoint_seconds: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    jwt_secret: str = dataclasses.field(repr=False)
    jwt_public_key_file: str
    jwt_algorithms: tuple[str, ...]
    jwt_audience: str
    jwt_issuer: str
    user_id_claim: str
    jwt_require_exp: bool

    @property
    def enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    window_seconds: float
    authenticated_limit: int
    anonymous_limit: int


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    redis_url: str = dataclasses.field(repr=False)
    key_prefix: str
    node_id: str
    lock_ttl_seconds: float

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    ai: AISettings
    storage: StorageSettings
    auth: AuthSettings
    rate_limit: RateLimitSettings
    cluster: ClusterSettings
    #: what a relative sqlite_path is relative to: the settings file's folder, else the
    #: application's (run.py's, or the executable's) folder
    base_dir: Path = dataclasses.field(default=Path("."), compare=False)

    @property
    def sqlite_file(self) -> Path:
        path = Path(self.storage.sqlite_path).expanduser()
        return path if path.is_absolute() else self.base_dir / path


_SECTION_TYPES = {
    "server": ServerSettings,
    "ai": AISettings,
    "storage": StorageSettings,
    "auth": AuthSettings,
    "rate_limit": RateLimitSettings,
    "cluster": ClusterSettings,
}


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _read_file(path: Path | None) -> dict[tuple[str, str], str]:
    if path is None:
        return {}
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_defaults__")
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise SettingsError("--config", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except configparser.Error as exc:
        # configparser's messages span lines; start-up errors are one line
        problem = " ".join(exc.message.split())
        raise SettingsError("--config", f"{str(path)!r} is not a valid settings file: {problem}") from None
    values: dict[tuple[str, str], str] = {}
    for section in parser.sections():
        if section not in SCHEMA:
            raise SettingsError(f"[{section}]", f"unknown section in {path.name}")
        for key, raw in parser.items(section):
            if key not in SCHEMA[section]:
                raise SettingsError(f"{section}.{key}", f"unknown key in {path.name}")
            values[(section, key)] = raw
    return values


def _read_environment(environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    known = {_env_name(section, key): (section, key) for section, keys in SCHEMA.items() for key in keys}
    values: dict[tuple[str, str], str] = {}
    for name, target in WELL_KNOWN_ENV.items():
        if name in environ:
            values[target] = environ[name]
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            if name not in known:
                raise SettingsError(name, "unknown setting in the environment")
            values[known[name]] = raw
    return values


def load_settings(
    config_path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], str] | None = None,
    base_dir: Path | None = None,
) -> Settings:
    """Merge defaults, the file, the environment and flag overrides, then parse and check.

    A relative sqlite_path is taken relative to the settings file, else to ``base_dir``
    (default: the working directory)."""
    raw: dict[tuple[str, str], str] = {
        (section, key): default for section, keys in SCHEMA.items() for key, (default, _) in keys.items()
    }
    raw.update(_read_file(config_path))
    raw.update(_read_environment(os.environ if environ is None else environ))
    raw.update(overrides or {})

    sections: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        parsed = {key: _parse(section, key, raw[(section, key)]) for key in keys}
        if section == "cluster" and not parsed["node_id"]:
            parsed["node_id"] = f"{socket.gethostname()}:{os.getpid()}"
        sections[section] = _SECTION_TYPES[section](**parsed)
    if config_path is not None:
        base_dir = config_path.parent
    settings = Settings(**sections, base_dir=(base_dir or Path.cwd()).resolve())
    _check_consistency(settings)
    return settings


def with_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """``settings`` with the environment's keys laid over it (a host passing a Settings object)."""
    changed: dict[str, dict[str, Any]] = {}
    for (section, key), raw in _read_environment(os.environ if environ is None else environ).items():
        changed.setdefault(section, {})[key] = _parse(section, key, raw)
    if not changed:
        return settings
    settings = dataclasses.replace(
        settings,
        **{section: dataclasses.replace(getattr(settings, section), **keys) for section, keys in changed.items()},
    )
    _check_consistency(settings)
    return settings


def _parse(section: str, key: str, raw: str) -> Any:
    try:
        return SCHEMA[section][key][1](raw)
    except ValueError as exc:
        raise SettingsError(f"{section}.{key}", str(exc)) from None


def _check_consistency(settings: Settings) -> None:
    auth = settings.auth
    uses_secret = any(name.startswith("HS") for name in auth.jwt_algorithms)
    uses_key = any(not name.startswith("HS") for name in auth.jwt_algorithms)
    # A public-key algorithm is only ever listed on purpose (the default is HS256): without its
    # key, auth would be silently off and every token refused.
    if uses_key and not auth.jwt_public_key_file:
        raise SettingsError(
            "auth.jwt_public_key_file", "a public-key algorithm is listed in jwt_algorithms but no key file is set"
        )
    if auth.enabled and uses_secret and not auth.jwt_secret:
        raise SettingsError("auth.jwt_secret", "an HS* algorithm is listed in jwt_algorithms but no secret is set")
    if settings.ai.resolved_provider == "openai" and not settings.ai.model:
        raise SettingsError("ai.model", "a model name is required for the openai provider")
    if settings.storage.mongodb_uri and not settings.storage.mongodb_database:
        raise SettingsError("storage.mongodb_database", "a database name is required with mongodb_uri")
