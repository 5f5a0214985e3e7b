"""Settings: defaults, the settings file, the environment, flags, bad values, and run.py itself."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.lifecycle import start_server
from server.settings import SCHEMA, WELL_KNOWN_ENV, Settings, SettingsError, load_settings
from tests.conftest import make_settings, sse_post
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
# The project's API reference: its settings table and the code cannot drift.
API_MD_CANDIDATES = (ROOT / "docs" / "API.md",)

# The defaults of API.md's settings table, typed.
EXPECTED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("server", "host"): "127.0.0.1",
    ("server", "port"): 7000,
    ("server", "cors_origins"): (),
    ("server", "trust_proxy_headers"): False,
    ("server", "max_body_bytes"): 65536,
    ("server", "heartbeat_seconds"): 15,
    ("server", "shutdown_grace_seconds"): 30,
    ("ai", "provider"): "auto",
    ("ai", "api_key"): "",
    ("ai", "base_url"): "",
    ("ai", "model"): "gpt-4o-mini",
    ("ai", "max_history_messages"): 20,
    ("ai", "max_message_chars"): 8000,
    ("ai", "request_timeout_seconds"): 60,
    ("ai", "on_client_disconnect"): "finish",
    ("storage", "mongodb_uri"): "",
    ("storage", "mongodb_database"): "aichat",
    ("storage", "mongodb_driver"): "motor",
    ("storage", "sqlite_path"): "data/chat.sqlite3",
    ("auth", "jwt_secret"): "",
    ("auth", "jwt_public_key_file"): "",
    ("auth", "jwt_algorithms"): ("HS256",),
    ("auth", "jwt_audience"): "",
    ("auth", "jwt_issuer"): "",
    ("auth", "user_id_claim"): "sub",
    ("rate_limit", "window_seconds"): 900,
    ("rate_limit", "authenticated_limit"): 100,
    ("rate_limit", "anonymous_limit"): 20,
    ("server", "idle_connection_timeout_seconds"): 75,
    ("server", "body_timeout_seconds"): 30,
    ("server", "socketio_ping_interval_seconds"): 25,
    ("server", "socketio_ping_timeout_seconds"): 20,
    ("server", "max_connections"): 0,
    ("server", "allowed_hosts"): (),
    ("server", "web_ui"): True,
    ("server", "metrics"): True,
    ("server", "log_format"): "text",
    ("ai", "max_retries"): 2,
    ("ai", "max_tokens"): None,
    ("storage", "checkpoint_seconds"): 2,
    ("auth", "jwt_require_exp"): True,
    ("cluster", "redis_url"): "",
    ("cluster", "key_prefix"): "aichat",
    ("cluster", "lock_ttl_seconds"): 15,
}


def value(settings: Settings, section: str, key: str) -> Any:
    return getattr(getattr(settings, section), key)


def api_md_keys() -> dict[tuple[str, str], str | None]:
    """(section, key) -> default as written in API.md's settings table (None when not given).

    Without API.md at hand, the table as transcribed in EXPECTED_DEFAULTS.
    """
    found = next((path for path in API_MD_CANDIDATES if path.exists()), None)
    if found is None:
        return {**{k: SCHEMA[k[0]][k[1]][0] or "empty" for k in EXPECTED_DEFAULTS}, ("ai", "system_prompt"): None}
    text = found.read_text(encoding="utf-8")
    table = text.split("### Settings", 1)[1].split("\n## ", 1)[0]
    keys: dict[tuple[str, str], str | None] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("section", "---"):
            continue
        for key, default in re.findall(r"([a-z_]+)(?:\s*\[([^\]]*)\])?", cells[1]):
            keys[(cells[0], key)] = None if not default and f"{key} [" not in cells[1] else default
    return keys


def write_ini(tmp_path: Path, text: str, name: str = "settings.ini") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def expect_error(key: str, path: Path | None = None, environ: dict[str, str] | None = None,
                 overrides: dict[tuple[str, str], str] | None = None) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(path, environ=environ or {}, overrides=overrides)
    assert caught.value.key == key
    assert key in str(caught.value)
    assert "\n" not in str(caught.value)
    return caught.value


# --- defaults and the shipped settings.ini -------------------------------------------------


def test_api_md_table_is_parsed():
    keys = api_md_keys()
    # + ai.system_prompt, which has no default there, and cluster.node_id, whose default is computed
    assert len(keys) == len(EXPECTED_DEFAULTS) + 2
    assert set(EXPECTED_DEFAULTS) <= set(keys)


def test_defaults_match_api_md():
    settings = load_settings(None, environ={})
    for (section, key), expected in EXPECTED_DEFAULTS.items():
        assert value(settings, section, key) == expected, (section, key)
    # and the table's own bracketed defaults, read with each key's parser
    for (section, key), default in api_md_keys().items():
        assert key in SCHEMA[section], (section, key)
        if default is not None and (section, key) != ("cluster", "node_id"):
            raw = "" if default == "empty" else default.split(" = ")[0]  # "0 = 80% of ...": the value
            assert value(settings, section, key) == SCHEMA[section][key][1](raw), (section, key)
    assert settings.ai.resolved_provider == "demo"
    host, _, pid = settings.cluster.node_id.rpartition(":")
    assert host == socket.gethostname() and pid == str(os.getpid())
    assert settings.auth.enabled is False


def test_shipped_settings_ini_has_every_key_and_the_defaults():
    shipped = ROOT / "settings.ini"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(shipped, encoding="utf-8")
    for section, key in api_md_keys():
        assert parser.has_option(section, key), f"settings.ini lacks [{section}] {key}"
    for section, keys in SCHEMA.items():
        for key in keys:
            assert parser.has_option(section, key), f"settings.ini lacks [{section}] {key}"
    assert load_settings(shipped, environ={}) == load_settings(None, environ={})


# --- precedence ---------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, file_value, env_value, flag_value, typed", [
    ("server", "port", "7101", "7102", "7103", int),
    ("ai", "model", "file-model", "env-model", "flag-model", str),
    ("storage", "mongodb_database", "filedb", "envdb", "flagdb", str),
    ("auth", "user_id_claim", "file_claim", "env_claim", "flag_claim", str),
    ("rate_limit", "anonymous_limit", "31", "32", "33", int),
])
def test_precedence_flag_env_file_default(tmp_path, section, key, file_value, env_value, flag_value, typed):
    path = write_ini(tmp_path, f"[{section}]\n{key} = {file_value}\n")
    env = {f"AICHAT_{section}_{key}".upper(): env_value}
    flag = {(section, key): flag_value}
    default = SCHEMA[section][key][0]
    assert value(load_settings(None, environ={}), section, key) == typed(default)
    assert value(load_settings(path, environ={}), section, key) == typed(file_value)
    assert value(load_settings(path, environ=env), section, key) == typed(env_value)
    assert value(load_settings(path, environ=env, overrides=flag), section, key) == typed(flag_value)
    assert value(load_settings(None, environ={}, overrides=flag), section, key) == typed(flag_value)


def test_aichat_environment_name_for_every_key(tmp_path):
    settings = load_settings(None, environ={"AICHAT_RATE_LIMIT_ANONYMOUS_LIMIT": "3",
                                            "AICHAT_SERVER_CORS_ORIGINS": "https://a.example, https://b.example",
                                            "AICHAT_SERVER_TRUST_PROXY_HEADERS": "true",
                                            "AICHAT_AI_ON_CLIENT_DISCONNECT": "cancel",
                                            "AICHAT_STORAGE_SQLITE_PATH": str(tmp_path / "x.db")})
    assert settings.rate_limit.anonymous_limit == 3
    assert settings.server.cors_origins == ("https://a.example", "https://b.example")
    assert settings.server.trust_proxy_headers is True
    assert settings.ai.on_client_disconnect == "cancel"
    assert settings.storage.sqlite_path == str(tmp_path / "x.db")


@pytest.mark.parametrize("name, raw, section, key, typed", [
    ("PORT", "8123", "server", "port", 8123),
    ("HOST", "0.0.0.0", "server", "host", "0.0.0.0"),
    ("OPENAI_API_KEY", "sk-from-env", "ai", "api_key", "sk-from-env"),
    ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1", "ai", "base_url", "http://127.0.0.1:11434/v1"),
    ("OPENAI_MODEL", "llama3", "ai", "model", "llama3"),
    ("MONGODB_URI", "mongodb://db.example:27017", "storage", "mongodb_uri", "mongodb://db.example:27017"),
    ("JWT_SECRET", "s3cret", "auth", "jwt_secret", "s3cret"),
])
def test_well_known_environment_names(tmp_path, name, raw, section, key, typed):
    assert WELL_KNOWN_ENV[name] == (section, key)
    assert value(load_settings(None, environ={name: raw}), section, key) == typed
    # beats the file
    path = write_ini(tmp_path, f"[{section}]\n{key} = {SCHEMA[section][key][0] or 'from-file'}\n")
    assert value(load_settings(path, environ={name: raw}), section, key) == typed
    # the AICHAT_ form of the same key wins over the well-known name
    specific = "9001" if key == "port" else "specific"
    winner = load_settings(path, environ={name: raw, f"AICHAT_{section}_{key}".upper(): specific})
    assert value(winner, section, key) == (9001 if key == "port" else "specific")


def test_api_key_from_environment_selects_openai():
    assert load_settings(None, environ={"OPENAI_API_KEY": "sk-x"}).ai.resolved_provider == "openai"
    assert load_settings(None, environ={"OPENAI_API_KEY": "sk-x", "AICHAT_AI_PROVIDER": "demo"}
                         ).ai.resolved_provider == "demo"


def test_secrets_stay_out_of_repr():
    settings = load_settings(None, environ={"OPENAI_API_KEY": "sk-hidden", "JWT_SECRET": "jwt-hidden",
                                            "MONGODB_URI": "mongodb://user:pw-hidden@h/"})
    text = repr(settings)
    assert "sk-hidden" not in text and "jwt-hidden" not in text and "pw-hidden" not in text


# --- bad values ---------------------------------------------------------------------------


def test_unknown_section_in_file(tmp_path):
    expect_error("[bogus]", write_ini(tmp_path, "[bogus]\nx = 1\n"))


def test_unknown_key_in_file(tmp_path):
    expect_error("server.colour", write_ini(tmp_path, "[server]\ncolour = red\n"))


def test_unknown_key_in_environment():
    expect_error("AICHAT_SERVER_COLOUR", environ={"AICHAT_SERVER_COLOUR": "red"})


@pytest.mark.parametrize("section, key, raw", [
    ("server", "port", "abc"),
    ("server", "port", "70000"),
    ("server", "port", "-1"),
    ("server", "max_body_bytes", "0"),
    ("rate_limit", "anonymous_limit", "-5"),
    ("rate_limit", "authenticated_limit", "1.5"),
    ("rate_limit", "window_seconds", "0"),
    ("ai", "provider", "foo"),
    ("ai", "on_client_disconnect", "sometimes"),
    ("ai", "max_message_chars", "0"),
    ("ai", "request_timeout_seconds", "nan"),
    ("server", "trust_proxy_headers", "maybe"),
    ("server", "heartbeat_seconds", "0"),
    ("server", "heartbeat_seconds", "-1"),
    ("storage", "mongodb_driver", "pymongo2"),
    ("auth", "jwt_algorithms", "none"),
    ("auth", "jwt_algorithms", ""),
])
def test_bad_value_names_the_key(tmp_path, section, key, raw):
    name = f"{section}.{key}"
    expect_error(name, write_ini(tmp_path, f"[{section}]\n{key} = {raw}\n"))
    expect_error(name, environ={f"AICHAT_{section}_{key}".upper(): raw})
    expect_error(name, overrides={(section, key): raw})


def test_bad_well_known_value_names_the_key():
    expect_error("server.port", environ={"PORT": "http"})


def test_unreadable_public_key_file(tmp_path):
    missing = tmp_path / "nope.pem"
    error = expect_error("auth.jwt_public_key_file", environ={"AICHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(missing),
                                                               "AICHAT_AUTH_JWT_ALGORITHMS": "RS256"})
    assert "nope.pem" in str(error)
    expect_error("auth.jwt_public_key_file", overrides={("auth", "jwt_public_key_file"): str(tmp_path)})


def test_public_key_file_that_is_not_a_pem_key(tmp_path):
    garbage = tmp_path / "key.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    error = expect_error("auth.jwt_public_key_file", environ={"AICHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(garbage),
                                                               "AICHAT_AUTH_JWT_ALGORITHMS": "RS256"})
    assert "not a PEM public key" in str(error)


@pytest.mark.parametrize("environ", [
    {"AICHAT_AUTH_JWT_ALGORITHMS": "RS256"},
    {"AICHAT_AUTH_JWT_ALGORITHMS": "HS256,RS256", "JWT_SECRET": "s"},
    {"AICHAT_AUTH_JWT_ALGORITHMS": "ES256", "JWT_SECRET": "s"},
])
def test_public_key_algorithm_without_key_file(environ):
    expect_error("auth.jwt_public_key_file", environ=environ)


def test_hs_algorithm_with_key_file_but_no_secret(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = write_ini(tmp_path, public.decode(), name="key.pem")
    expect_error("auth.jwt_secret", environ={"AICHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(pem),
                                             "AICHAT_AUTH_JWT_ALGORITHMS": "RS256,HS256"})
    settings = load_settings(None, environ={"AICHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(pem),
                                            "AICHAT_AUTH_JWT_ALGORITHMS": "RS256"})
    assert settings.auth.enabled and settings.auth.jwt_algorithms == ("RS256",)


def test_unreadable_or_malformed_config_file(tmp_path):
    expect_error("--config", tmp_path / "missing.ini")
    expect_error("--config", write_ini(tmp_path, "port = 1\n"))


# --- run.py as a process ------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The host environment minus anything that configures the server."""
    env = {name: raw for name, raw in os.environ.items()
           if not name.startswith(("OPENAI_", "AICHAT_"))
           and name not in ("MONGODB_URI", "JWT_SECRET", "PORT", "HOST")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env



@pytest.mark.parametrize("ini, env, key", [
    ("[server]\nport = abc\n", {}, "server.port"),
    ("[server]\ncolour = red\n", {}, "server.colour"),
    ("[nope]\n", {}, "[nope]"),
    ("", {"AICHAT_AI_PROVIDER": "foo"}, "ai.provider"),
    ("", {"AICHAT_AUTH_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, "auth.jwt_public_key_file"),
])
def test_run_py_refuses_bad_setting(tmp_path, ini, env, key):
    config = write_ini(tmp_path, ini)
    done = subprocess.run([sys.executable, "run.py", "--config", str(config)], cwd=ROOT, env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert key in lines[0]
    assert "Traceback" not in done.stderr


def test_run_py_store_that_cannot_be_opened_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_ini(tmp_path, f"[storage]\nsqlite_path = {blocker}/chat.sqlite3\n")
    done = subprocess.run([sys.executable, "run.py", "--config", str(config), "--port", str(free_port())],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "cannot start" in line]


def test_upstream_endpoint_is_logged_without_credentials():
    from services.ai.openai_provider import OpenAIProvider

    provider = OpenAIProvider(api_key="", base_url="https://user:s3cret@llm.example:8443/v1?api-key=k3y",
                              model="m", timeout_seconds=1, max_retries=0)
    assert provider.endpoint == "https://llm.example:8443/v1"


def test_run_py_bad_flag_value(tmp_path):
    config = write_ini(tmp_path, "")
    done = subprocess.run([sys.executable, "run.py", "--config", str(config), "--port", "99999"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "server.port" in done.stderr


async def test_run_py_serves_and_stops_on_sigterm(tmp_path):
    config = write_ini(tmp_path, "[server]\nshutdown_grace_seconds = 2\n")
    port = free_port()
    db = tmp_path / "run.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run.py", "--config", str(config), "--port", str(port), cwd=ROOT,
        env=clean_env(AICHAT_STORAGE_SQLITE_PATH=str(db)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        seen: list[str] = []

        async def wait_listening() -> str:
            while True:
                raw = await process.stderr.readline()  # type: ignore[union-attr]
                assert raw, f"run.py exited early: {''.join(seen)}"
                seen.append(raw.decode())
                if "listening on" in seen[-1]:
                    return seen[-1]

        line = await asyncio.wait_for(wait_listening(), timeout=60)
        assert f"http://127.0.0.1:{port}" in line
        assert "demo" in line
        assert "sqlite" in line and str(db) in line

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=60)
        rest = (await process.stderr.read()).decode()
        assert code == 0, "".join(seen) + rest
        assert "Traceback" not in rest
        assert db.exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- the demo provider --------------------------------------------------------------------


async def test_demo_provider_without_key(tmp_path):
    settings = make_settings(tmp_path, None)
    assert settings.ai.provider == "auto" and settings.ai.resolved_provider == "demo"
    running = await start_server(settings)
    try:
        assert running.app.provider.name == "demo"
        result = await sse_post(running, {"message": "ping me"})
        assert result.status == 200, result.body
        assert result.last["done"] is True
        text = result.content
        assert "demo mode" in text
        assert "OPENAI_API_KEY" in text
        assert "ping me" in text
        assert len([e for e in result.events if "content" in e]) > 5  # streamed in pieces
    finally:
        await running.shutdown(0)


# --- where settings and the database are found (run.py, the binary) ---------------------


def test_relative_sqlite_path_is_relative_to_the_settings_file(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    ini = write_ini(folder, "[storage]\nsqlite_path = db/chat.sqlite3\n")
    assert load_settings(ini, environ={}).sqlite_file == folder.resolve() / "db" / "chat.sqlite3"
    # without a file: the given base (run.py: its own folder, or the executable's)
    assert load_settings(None, environ={}, base_dir=tmp_path).sqlite_file == tmp_path / "data" / "chat.sqlite3"
    absolute = tmp_path / "elsewhere.sqlite3"
    assert load_settings(ini, environ={"AICHAT_STORAGE_SQLITE_PATH": str(absolute)}).sqlite_file == absolute


def test_run_py_finds_settings_ini_beside_itself(tmp_path):
    import run

    assert run.settings_file(None) == ROOT / "settings.ini"
    given = tmp_path / "mine.ini"
    assert run.settings_file(given) == given  # --config wins, and must exist (checked on load)
    assert run.main(["--config", str(given)]) == 2
