"""JWT authentication: TokenVerifier on its own, and every bad token on every transport.

Real tokens (HS256, RS256, ES256 made with pyjwt and cryptography), a real server and
the fake upstream: a token that fails verification must be refused before anything is
sent to the model, on SSE, in a Socket.IO payload and in the Socket.IO handshake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.auth import LEEWAY_SECONDS, TokenVerifier
from services.errors import ChatError
from tests.conftest import http_json, sse_post

SECRET = "test-hs256-secret-0123456789-abcdefghijklmnop"  # >= 32 bytes
OTHER_SECRET = "another-hs256-secret-0123456789-qrstuvwxyz"
API_KEY = "sk-test-secret-key"


# --- keys and tokens -----------------------------------------------------------------


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


class Keys:
    def __init__(self) -> None:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_private = _pem_private(rsa_key)
        self.rsa_public = _pem_public(rsa_key)
        self.other_rsa_private = _pem_private(other_rsa)
        self.ec_private = _pem_private(ec_key)
        self.ec_public = _pem_public(ec_key)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str | None = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"iat": now, "exp": now + 3600, **extra}
    if sub is not None:
        values["sub"] = sub
    return values


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def unsigned_token(payload: dict[str, Any]) -> str:
    """`alg: none`, crafted by hand: header . payload . (empty signature)."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def hmac_with_key_as_secret(payload: dict[str, Any], secret: bytes) -> str:
    """The key-confusion attack: an HS256 token whose HMAC secret is the public key PEM.

    pyjwt refuses to make one, so it is signed by hand.
    """
    signing_input = (_b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + _b64(json.dumps(payload).encode()))
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def write_key(tmp_path: Path, name: str, pem: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(pem)
    return str(path)


# --- TokenVerifier, unit ---------------------------------------------------------------


def test_valid_hs256_token_gives_its_subject():
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.enabled
    assert verifier.user_id(hs256(claims("alice"))) == "alice"
    assert verifier.user_from_authorization("Bearer " + hs256(claims("bob"))) == "bob"
    assert verifier.user_from_authorization("bearer  " + hs256(claims("carol")) + " ") == "carol"


def test_valid_rs256_and_es256_tokens(keys: Keys):
    rs = TokenVerifier(public_key=keys.rsa_public.decode(), algorithms=("RS256",))
    assert rs.user_id(jwt.encode(claims("rsa-user"), keys.rsa_private, algorithm="RS256")) == "rsa-user"
    es = TokenVerifier(public_key=keys.ec_public.decode(), algorithms=("ES256",))
    assert es.user_id(jwt.encode(claims("ec-user"), keys.ec_private, algorithm="ES256")) == "ec-user"
    # an ES256 token is not accepted where only RS256 is configured, and vice versa
    with pytest.raises(ChatError) as caught:
        rs.user_id(jwt.encode(claims("ec-user"), keys.ec_private, algorithm="ES256"))
    assert caught.value.code == "invalid_token"
    with pytest.raises(ChatError) as caught:
        es.user_id(jwt.encode(claims("rsa-user"), keys.rsa_private, algorithm="RS256"))
    assert caught.value.code == "invalid_token"


def test_absent_and_null_tokens_are_anonymous():
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.user_id(None) is None
    assert verifier.user_from_authorization(None) is None
    # also when authentication is not configured at all
    assert TokenVerifier().user_id(None) is None
    assert TokenVerifier().user_from_authorization(None) is None


def test_a_non_string_token_is_an_invalid_request():
    with pytest.raises(ChatError) as caught:
        TokenVerifier(secret=SECRET).user_id(12345)
    assert caught.value.code == "invalid_request"


def test_leeway_accepts_slightly_expired_and_slightly_early_tokens():
    verifier = TokenVerifier(secret=SECRET)
    now = int(time.time())
    just_expired = hs256({"sub": "alice", "exp": now - LEEWAY_SECONDS // 2})
    almost_valid = hs256({"sub": "alice", "nbf": now + LEEWAY_SECONDS // 2, "exp": now + 3600})
    assert verifier.user_id(just_expired) == "alice"
    assert verifier.user_id(almost_valid) == "alice"


def test_a_token_verified_before_still_expires_and_waits_for_its_start():
    # verified tokens are remembered; a remembered one must keep its time limits
    now = time.time()
    clock = [now]
    verifier = TokenVerifier(secret=SECRET, clock=lambda: clock[0])
    token = hs256({"sub": "alice", "iat": int(now), "exp": int(now) + 60})
    early = hs256({"sub": "carol", "nbf": int(now) - 1, "exp": int(now) + 3600})
    assert verifier.user_id(token) == "alice"
    assert verifier.user_id(early) == "carol"
    assert verifier.user_id(token) == "alice"
    clock[0] = now - LEEWAY_SECONDS - 5  # before `nbf`, and before `iat`, leeway included
    for remembered in (early, token):
        with pytest.raises(ChatError) as caught:
            verifier.user_id(remembered)
        assert (caught.value.code, caught.value.message) == ("invalid_token", "The token is not valid yet.")
    clock[0] = now
    assert verifier.user_id(early) == "carol"
    clock[0] = now + 60 + LEEWAY_SECONDS + 1
    with pytest.raises(ChatError) as caught:
        verifier.user_id(token)
    assert (caught.value.code, caught.value.message) == ("invalid_token", "The token has expired.")


def test_custom_user_id_claim():
    verifier = TokenVerifier(secret=SECRET, user_id_claim="uid")
    assert verifier.user_id(hs256(claims(None, uid="u-17"))) == "u-17"
    assert verifier.user_id(hs256(claims(None, uid=42))) == "42"  # numeric ids become text
    for bad in (claims("alice"), claims(None, uid=True), claims(None, uid=""), claims(None, uid=["x"])):
        with pytest.raises(ChatError) as caught:
            verifier.user_id(hs256(bad))
        assert caught.value.code == "invalid_token"


def test_audience_and_issuer_when_configured():
    verifier = TokenVerifier(secret=SECRET, audience="chat-api", issuer="https://issuer.example")
    good = hs256(claims("alice", aud="chat-api", iss="https://issuer.example"))
    assert verifier.user_id(good) == "alice"
    # a list of audiences containing ours is fine too
    assert verifier.user_id(hs256(claims("alice", aud=["other", "chat-api"], iss="https://issuer.example"))) == "alice"
    for bad in (
        claims("alice", aud="other-api", iss="https://issuer.example"),
        claims("alice", aud="chat-api", iss="https://evil.example"),
        claims("alice", iss="https://issuer.example"),  # no audience
        claims("alice", aud="chat-api"),  # no issuer
    ):
        with pytest.raises(ChatError) as caught:
            verifier.user_id(hs256(bad))
        assert caught.value.code == "invalid_token"
    # without configured audience, a token that carries one is still accepted
    assert TokenVerifier(secret=SECRET).user_id(hs256(claims("alice", aud="anything"))) == "alice"


def _unit_bad_tokens(keys: Keys) -> list[tuple[str, TokenVerifier, str]]:
    hs = TokenVerifier(secret=SECRET)
    rs = TokenVerifier(public_key=keys.rsa_public.decode(), algorithms=("RS256",))
    mixed = TokenVerifier(secret=SECRET, public_key=keys.rsa_public.decode(), algorithms=("RS256", "HS256"))
    now = int(time.time())
    return [
        ("expired", hs, hs256({"sub": "alice", "exp": now - 3600})),
        ("not yet valid", hs, hs256({"sub": "alice", "nbf": now + 3600, "exp": now + 7200})),
        ("wrong secret", hs, hs256(claims("alice"), OTHER_SECRET)),
        ("alg none", hs, unsigned_token(claims("alice"))),
        ("alg none, rs", rs, unsigned_token(claims("alice"))),
        ("key confusion", rs, hmac_with_key_as_secret(claims("alice"), keys.rsa_public)),
        ("key confusion, mixed", mixed, hmac_with_key_as_secret(claims("alice"), keys.rsa_public)),
        ("other rsa key", rs, jwt.encode(claims("alice"), keys.other_rsa_private, algorithm="RS256")),
        ("hs to rs-only", rs, hs256(claims("alice"))),
        ("garbage", hs, "abc.def"),
        ("header not an object", hs, _b64(b"[]") + "." + _b64(b'{"sub":"alice"}') + ".sig"),
        ("header without alg", hs, _b64(b'{"typ":"JWT"}') + "." + _b64(b'{"sub":"alice"}') + ".sig"),
        ("alg not a string", hs, _b64(b'{"alg":["HS256"]}') + "." + _b64(b'{"sub":"alice"}') + ".sig"),
        ("not a jwt", hs, "not-a-token"),
        ("empty", hs, "   "),
        ("no sub", hs, hs256(claims(None))),
        ("non-string sub", hs, hs256({"sub": 42, "exp": now + 3600})),
        ("auth not configured", TokenVerifier(), hs256(claims("alice"))),
    ]


def test_bad_tokens_raise_invalid_token(keys: Keys):
    for name, verifier, token in _unit_bad_tokens(keys):
        with pytest.raises(ChatError) as caught:
            verifier.user_id(token)
        assert caught.value.code == "invalid_token", name
        # the message is safe to show: it never echoes the token or the secret
        assert token.strip() == "" or token not in caught.value.message, name
        assert SECRET not in caught.value.message, name


def test_mixed_algorithms_accept_the_real_secret(keys: Keys):
    mixed = TokenVerifier(secret=SECRET, public_key=keys.rsa_public.decode(), algorithms=("RS256", "HS256"))
    assert mixed.user_id(hs256(claims("alice"))) == "alice"
    assert mixed.user_id(jwt.encode(claims("bob"), keys.rsa_private, algorithm="RS256")) == "bob"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc", "", "abc.def.ghi"])
def test_malformed_authorization_headers(header: str):
    with pytest.raises(ChatError) as caught:
        TokenVerifier(secret=SECRET).user_from_authorization(header)
    assert caught.value.code == "invalid_token"


# --- end to end: bad tokens on three paths ---------------------------------------------


def _bad_case(name: str, keys: Keys, tmp_path: Path) -> tuple[dict[str, str], str]:
    """(server overrides, token) for one bad-token case."""
    now = int(time.time())
    hs_server = {"auth__jwt_secret": SECRET}
    rs_server = {"auth__jwt_public_key_file": write_key(tmp_path, "rsa.pem", keys.rsa_public),
                 "auth__jwt_algorithms": "RS256"}
    mixed_server = {**rs_server, "auth__jwt_secret": SECRET, "auth__jwt_algorithms": "RS256,HS256"}
    aud_server = {**hs_server, "auth__jwt_audience": "chat-api", "auth__jwt_issuer": "https://issuer.example"}
    cases: dict[str, tuple[dict[str, str], str]] = {
        "expired": (hs_server, hs256({"sub": "alice", "iat": now - 7200, "exp": now - 3600})),
        "not_yet_valid": (hs_server, hs256({"sub": "alice", "nbf": now + 3600, "exp": now + 7200})),
        "wrong_signature": (hs_server, hs256(claims("alice"), OTHER_SECRET)),
        "tampered_payload": (hs_server, _tamper(hs256(claims("alice")))),
        "alg_none": (hs_server, unsigned_token(claims("alice"))),
        "alg_none_rs_server": (rs_server, unsigned_token(claims("alice"))),
        "key_confusion_rs256": (rs_server, hmac_with_key_as_secret(claims("alice"), keys.rsa_public)),
        "key_confusion_rs256_hs256": (mixed_server, hmac_with_key_as_secret(claims("alice"), keys.rsa_public)),
        "other_rsa_key": (rs_server, jwt.encode(claims("alice"), keys.other_rsa_private, algorithm="RS256")),
        "wrong_audience": (aud_server, hs256(claims("alice", aud="other-api", iss="https://issuer.example"))),
        "wrong_issuer": (aud_server, hs256(claims("alice", aud="chat-api", iss="https://evil.example"))),
        "garbage": (hs_server, "abc.def"),
        "missing_sub": (hs_server, hs256(claims(None, name="alice"))),
        "custom_claim_missing": ({**hs_server, "auth__user_id_claim": "uid"}, hs256(claims("alice"))),
        "auth_not_configured": ({}, hs256(claims("alice"))),
    }
    return cases[name]


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "mallory"
    return f"{header}.{_b64(json.dumps(body).encode())}.{signature}"


BAD_CASES = [
    "expired", "not_yet_valid", "wrong_signature", "tampered_payload", "alg_none", "alg_none_rs_server",
    "key_confusion_rs256", "key_confusion_rs256_hs256", "other_rsa_key", "wrong_audience", "wrong_issuer",
    "garbage", "missing_sub", "custom_claim_missing", "auth_not_configured",
]
PATHS = ["sse", "socket_payload", "socket_handshake"]


async def chat_with_token(path: str, server, socket_client, token: str, message: str = "Hello",
                          session_id: str | None = None) -> dict[str, Any]:
    """Send one chat message carrying ``token`` on ``path``; a uniform view of the outcome."""
    payload: dict[str, Any] = {"message": message}
    if session_id is not None:
        payload["sessionId"] = session_id
    if path == "sse":
        result = await sse_post(server, payload, headers={"Authorization": f"Bearer {token}"})
        if result.status != 200:
            return {"ok": False, "status": result.status, "code": result.body["code"], "body": result.body}
        return {"ok": True, "status": 200, "sessionId": result.last["sessionId"], "text": result.content,
                "done": result.last.get("done")}
    if path == "socket_payload":
        client = await socket_client(server)
        events = await client.chat({**payload, "token": token})
    else:
        client = await socket_client(server, auth={"token": token})
        events = await client.chat(payload)
    name, data = events[-1]
    if name == "ai:error":
        return {"ok": False, "code": data["code"], "body": data}
    return {"ok": True, "sessionId": data["sessionId"], "text": data["response"], "done": True}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_token_is_refused_before_the_upstream(case, path, keys, tmp_path, make_server, upstream,
                                                        socket_client):
    overrides, token = _bad_case(case, keys, tmp_path)
    server = await make_server(**overrides)
    before = len(upstream.requests)
    outcome = await chat_with_token(path, server, socket_client, token)
    assert outcome["ok"] is False, outcome
    assert outcome["code"] == "invalid_token", outcome
    if path == "sse":
        assert outcome["status"] == 401
        assert set(outcome["body"]) == {"error", "code"}
    assert token not in json.dumps(outcome["body"])
    assert len(upstream.requests) == before


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc.def.ghi"])
async def test_sse_malformed_authorization_header(header, make_server, upstream):
    server = await make_server(auth__jwt_secret=SECRET)
    result = await sse_post(server, {"message": "Hello"}, headers={"Authorization": header})
    assert result.status == 401
    assert result.body["code"] == "invalid_token"
    assert upstream.requests == []


async def test_null_payload_token_without_handshake_token_is_anonymous(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET)
    client = await socket_client(server)
    events = await client.chat({"message": "Hello", "token": None})
    name, data = events[-1]
    assert name == "ai:complete", events
    assert data["response"] == "Hello, world!"
    assert len(upstream.requests) == 1
    # the session is anonymous: readable without any token
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{data['sessionId']}")
    assert status == 200
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]


async def test_payload_token_wins_over_handshake_token(make_server, upstream, socket_client):
    server = await make_server(auth__jwt_secret=SECRET)
    # bad handshake token, good payload token: the payload one is used
    client = await socket_client(server, auth={"token": "abc.def"})
    name, data = (await client.chat({"message": "Hello", "token": hs256(claims("alice"))}))[-1]
    assert name == "ai:complete", data
    # good handshake token, bad payload token: refused
    other = await socket_client(server, auth={"token": hs256(claims("alice"))})
    before = len(upstream.requests)
    name, data = (await other.chat({"message": "Hello", "token": "abc.def"}))[-1]
    assert (name, data["code"]) == ("ai:error", "invalid_token")
    assert len(upstream.requests) == before


# --- end to end: valid tokens on three paths -------------------------------------------


def _valid_server_and_token(kind: str, keys: Keys, tmp_path: Path, user: str) -> tuple[dict[str, str], str]:
    if kind == "HS256":
        return {"auth__jwt_secret": SECRET}, hs256(claims(user))
    if kind == "RS256":
        return ({"auth__jwt_public_key_file": write_key(tmp_path, "rsa.pem", keys.rsa_public),
                 "auth__jwt_algorithms": "RS256"},
                jwt.encode(claims(user), keys.rsa_private, algorithm="RS256"))
    return ({"auth__jwt_public_key_file": write_key(tmp_path, "ec.pem", keys.ec_public),
             "auth__jwt_algorithms": "ES256"},
            jwt.encode(claims(user), keys.ec_private, algorithm="ES256"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["HS256", "RS256", "ES256"])
async def test_valid_token_reaches_upstream_and_owns_the_session(kind, path, keys, tmp_path, make_server, upstream,
                                                                 socket_client):
    overrides, token = _valid_server_and_token(kind, keys, tmp_path, "alice")
    server = await make_server(**overrides)
    outcome = await chat_with_token(path, server, socket_client, token, message="Owned question")
    assert outcome["ok"] is True, outcome
    assert outcome["text"] == "Hello, world!"
    assert len(upstream.requests) == 1
    assert upstream.requests[0].body["messages"][-1]["content"] == "Owned question"
    session_id = outcome["sessionId"]

    auth = {"Authorization": f"Bearer {token}"}
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions", headers=auth)
    assert status == 200
    assert [s["sessionId"] for s in body["sessions"]] == [session_id]
    assert body["sessions"][0]["messageCount"] == 2
    # owned: the history is not readable anonymously
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}")
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = await http_json(server, "GET", f"/api/v2/ai/chat/sessions/{session_id}", headers=auth)
    assert status == 200
    assert [m["content"] for m in body["messages"]] == ["Owned question", "Hello, world!"]


async def test_custom_user_id_claim_end_to_end(make_server, upstream):
    server = await make_server(auth__jwt_secret=SECRET, auth__user_id_claim="uid")
    token = hs256(claims("not-the-user", uid="user-7"))
    result = await sse_post(server, {"message": "Hi", "sessionId": "uid-session"},
                            headers={"Authorization": f"Bearer {token}"})
    assert result.status == 200, result.body
    # the owner is the uid: another token with the same uid but another sub sees the session
    same_uid = hs256(claims("someone-else", uid="user-7"))
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions",
                                      headers={"Authorization": f"Bearer {same_uid}"})
    assert status == 200
    assert [s["sessionId"] for s in body["sessions"]] == ["uid-session"]
    other_uid = hs256(claims("not-the-user", uid="user-8"))
    status, body, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions",
                                      headers={"Authorization": f"Bearer {other_uid}"})
    assert (status, body["sessions"]) == (200, [])


async def test_audience_and_issuer_end_to_end(make_server, upstream):
    server = await make_server(auth__jwt_secret=SECRET, auth__jwt_audience="chat-api",
                               auth__jwt_issuer="https://issuer.example")
    good = hs256(claims("alice", aud="chat-api", iss="https://issuer.example"))
    result = await sse_post(server, {"message": "Hi"}, headers={"Authorization": f"Bearer {good}"})
    assert result.status == 200, result.body
    assert result.last["done"] is True
    no_claims = hs256(claims("alice"))
    result = await sse_post(server, {"message": "Hi"}, headers={"Authorization": f"Bearer {no_claims}"})
    assert (result.status, result.body["code"]) == (401, "invalid_token")
    assert len(upstream.requests) == 1


async def test_mixed_algorithms_server_accepts_both_real_signatures(keys, tmp_path, make_server, upstream):
    server = await make_server(auth__jwt_secret=SECRET, auth__jwt_algorithms="RS256,HS256",
                               auth__jwt_public_key_file=write_key(tmp_path, "rsa.pem", keys.rsa_public))
    for token in (hs256(claims("alice")), jwt.encode(claims("alice"), keys.rsa_private, algorithm="RS256")):
        result = await sse_post(server, {"message": "Hi"}, headers={"Authorization": f"Bearer {token}"})
        assert result.status == 200, result.body
    assert len(upstream.requests) == 2


# --- secrets never reach the logs ------------------------------------------------------


async def test_secrets_never_appear_in_logs(caplog, make_server, upstream, socket_client):
    caplog.set_level(logging.DEBUG)  # everything, the OpenAI client's debug log included
    for name in ("aichat", "tornado", "socketio", "engineio"):
        caplog.set_level(logging.DEBUG, logger=name)
    server = await make_server(auth__jwt_secret=SECRET)
    good = hs256(claims("alice"))
    bad = hs256(claims("alice"), OTHER_SECRET)

    assert (await sse_post(server, {"message": "Hi"}, headers={"Authorization": f"Bearer {good}"})).status == 200
    assert (await sse_post(server, {"message": "Hi"}, headers={"Authorization": f"Bearer {bad}"})).status == 401
    assert (await sse_post(server, {"message": "Hi"}, headers={"Authorization": "Basic " + bad})).status == 401
    client = await socket_client(server, auth={"token": good})
    assert (await client.chat({"message": "Hi"}))[-1][0] == "ai:complete"
    assert (await client.chat({"message": "Hi", "token": bad}))[-1][1]["code"] == "invalid_token"
    handshake_bad = await socket_client(server, auth={"token": bad})
    assert (await handshake_bad.chat({"message": "Hi"}))[-1][1]["code"] == "invalid_token"
    status, _, _ = await http_json(server, "GET", "/api/v2/ai/chat/sessions",
                                   headers={"Authorization": f"Bearer {bad}"})
    assert status == 401
    # the upstream got the key, so it was in play
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"

    assert caplog.records, "nothing was logged: the check would prove nothing"
    logged = [caplog.text]
    for record in caplog.records:
        logged.append(record.getMessage())
        logged.append(repr(record.args))
        logged.append(record.exc_text or "")
    text = "\n".join(logged)
    for secret in (good, bad, good.split(".")[2], bad.split(".")[2], SECRET, OTHER_SECRET, API_KEY):
        assert secret not in text
