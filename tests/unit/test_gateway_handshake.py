"""The reference gateway's handshake identity (gateway/handshake.py): which tokens and headers
name a principal, which are refused with what, and which settings cannot start."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from conntrack.gateway.handshake import (
    NOBODY,
    HandshakeConfigError,
    HandshakeRefused,
    Handshakes,
    Identity,
)
from tests.support.tokens import (
    HS_SECRET,
    Keys,
    claims,
    hs256_with_public_key,
    make_keys,
    sign,
    unsigned,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refusal(handshakes: Handshakes, headers: dict[str, str], path: str = "/") -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as err:
        handshakes.identify(headers, path)
    return err.value


def test_no_auth_names_nobody() -> None:
    assert Handshakes().identify({}, "/") is NOBODY


@pytest.mark.parametrize("key_kind", ["rsa_pem", "ec_pem", "jwks-rsa", "jwks-ec", "hs"])
def test_a_valid_token_names_its_principal(keys: Keys, key_kind: str) -> None:
    token: str
    if key_kind == "rsa_pem":
        handshakes, token = (
            Handshakes("jwt", key_file=keys.rsa_pem),
            sign(claims(), keys.rsa_private, "RS256"),
        )
    elif key_kind == "ec_pem":
        handshakes, token = (
            Handshakes("jwt", key_file=keys.ec_pem),
            sign(claims(), keys.ec_private, "ES256"),
        )
    elif key_kind == "jwks-rsa":
        handshakes = Handshakes("jwt", key_file=keys.jwks)
        token = sign(claims(), keys.rsa_private, "RS256", kid="rsa-1")
    elif key_kind == "jwks-ec":
        handshakes = Handshakes("jwt", key_file=keys.jwks)
        token = sign(claims(), keys.ec_private, "ES256", kid="ec-1")
    else:
        handshakes = Handshakes("jwt", key_file=keys.hs_secret)
        token = sign(claims(), HS_SECRET, "HS256")
    assert handshakes.identify(bearer(token), "/") == Identity("alice")
    # Browsers cannot set headers on a WebSocket: the access_token parameter serves too.
    assert handshakes.identify({}, f"/chat?access_token={token}") == Identity("alice")


def bad_tokens(keys: Keys) -> dict[str, tuple[str, str]]:
    """name -> (token, what the refusal says)."""
    return {
        "expired": (sign(claims(exp=1), keys.rsa_private, "RS256"), "expired"),
        "not yet valid": (
            sign(claims(nbf=claims()["exp"]), keys.rsa_private, "RS256"),
            "not yet valid",
        ),
        "wrong key": (sign(claims(), keys.other_rsa_private, "RS256"), "Signature verification"),
        "alg none": (unsigned(claims()), "alg"),
        "HS256 keyed with the public key": (
            hs256_with_public_key(claims(), keys.rsa_pem),
            "alg",
        ),
        "another asymmetric algorithm": (sign(claims(), keys.ec_private, "ES256"), "alg"),
        "missing claim": (sign({"exp": claims()["exp"]}, keys.rsa_private, "RS256"), "'sub'"),
        "claim not a string": (sign(claims(sub=42), keys.rsa_private, "RS256"), "must be a string"),
        "principal too long": (
            sign(claims(sub="p" * 256), keys.rsa_private, "RS256"),
            "at most 255",
        ),
        "garbage": ("not.a.token", "invalid token"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "expired",
        "not yet valid",
        "wrong key",
        "alg none",
        "HS256 keyed with the public key",
        "another asymmetric algorithm",
        "missing claim",
        "claim not a string",
        "principal too long",
        "garbage",
    ],
)
def test_bad_tokens_are_401(keys: Keys, name: str) -> None:
    token, why = bad_tokens(keys)[name]
    handshakes = Handshakes("jwt", key_file=keys.rsa_pem)
    refused = refusal(handshakes, bearer(token))
    assert refused.status == HTTPStatus.UNAUTHORIZED
    assert why in str(refused), str(refused)


def test_no_token_is_401(keys: Keys) -> None:
    refused = refusal(Handshakes("jwt", key_file=keys.rsa_pem), {"Authorization": "Basic x"})
    assert refused.status == HTTPStatus.UNAUTHORIZED
    assert "bearer token is required" in str(refused)


def test_an_unknown_kid_of_a_jwks_is_401(keys: Keys) -> None:
    token = sign(claims(), keys.rsa_private, "RS256", kid="rotated-away")
    refused = refusal(Handshakes("jwt", key_file=keys.jwks), bearer(token))
    assert "unknown key id" in str(refused)


def test_audience_and_issuer_are_checked_when_set(keys: Keys) -> None:
    handshakes = Handshakes("jwt", key_file=keys.rsa_pem, audience="chat", issuer="https://idp")
    good = sign(claims(aud="chat", iss="https://idp"), keys.rsa_private, "RS256")
    assert handshakes.identify(bearer(good), "/").principal == "alice"
    for bad in (claims(aud="other", iss="https://idp"), claims(aud="chat"), claims()):
        assert refusal(handshakes, bearer(sign(bad, keys.rsa_private, "RS256"))).status == 401
    # Without an audience setting, a token's aud is not judged.
    plain = Handshakes("jwt", key_file=keys.rsa_pem)
    assert plain.identify(bearer(good), "/").principal == "alice"


def test_another_principal_claim(keys: Keys) -> None:
    handshakes = Handshakes("jwt", key_file=keys.rsa_pem, principal_claim="email")
    token = sign(claims(email="a@example.com"), keys.rsa_private, "RS256")
    assert handshakes.identify(bearer(token), "/").principal == "a@example.com"


def test_labels_from_claims_headers_and_query(keys: Keys) -> None:
    handshakes = Handshakes(
        "jwt",
        key_file=keys.rsa_pem,
        labels="tenant=claim:tid, tier=claim:tier, device=header:X-Device, app=query:v, "
        "absent=header:X-None",
    )
    token = sign(claims(tid="acme", tier=3), keys.rsa_private, "RS256")
    identity = handshakes.identify(bearer(token) | {"X-Device": "ios"}, "/ws?v=2.1&x=y")
    assert identity == Identity(
        "alice", (("app", "2.1"), ("device", "ios"), ("tenant", "acme"), ("tier", "3"))
    )


@pytest.mark.parametrize(
    ("extra", "headers", "why"),
    [
        ({"tid": {"nested": 1}}, {}, "not a string or a number"),
        ({"tid": "x" * 256}, {}, "at most 255 characters"),
        ({}, {"X-Device": "a,b"}, "must not contain"),
    ],
)
def test_a_label_the_events_cannot_carry_is_400(
    keys: Keys, extra: dict[str, Any], headers: dict[str, str], why: str
) -> None:
    handshakes = Handshakes(
        "jwt", key_file=keys.rsa_pem, labels="tenant=claim:tid,device=header:X-Device"
    )
    token = sign(claims(**extra), keys.rsa_private, "RS256")
    refused = refusal(handshakes, bearer(token) | headers)
    assert refused.status == HTTPStatus.BAD_REQUEST
    assert why in str(refused)


def test_a_trusted_proxy_header_names_the_principal() -> None:
    handshakes = Handshakes("header", principal_header="X-User", labels="tenant=header:X-Tenant")
    assert handshakes.identify({"X-User": "bob", "X-Tenant": "t1"}, "/") == Identity(
        "bob", (("tenant", "t1"),)
    )
    refused = refusal(handshakes, {"X-Tenant": "t1"})
    assert refused.status == HTTPStatus.UNAUTHORIZED
    assert "X-User header is missing" in str(refused)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"mode": "jwt"}, "needs gateway_jwt_key_file"),
        ({"mode": "jwt", "key_file": Path("/nonexistent/key.pem")}, "No such file"),
        ({"mode": "jwt", "short_secret": True}, "at least 32 bytes"),
        ({"mode": "jwt", "bad_pem": True}, "not a PEM public key"),
        ({"mode": "jwt", "bad_jwks": True}, "not a usable JWKS"),
        ({"mode": "none", "labels": "tenant=claim:tid"}, "only with gateway_auth=jwt"),
        ({"mode": "none", "labels": "tenant"}, "not key=source:name"),
        ({"mode": "none", "labels": "tenant=cookie:x"}, "not key=source:name"),
        ({"mode": "none", "labels": "-t=header:x"}, "must be letters"),
        ({"mode": "none", "labels": "t=header:x,t=query:y"}, "twice"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_start(
    tmp_path: Path, options: dict[str, Any], why: str
) -> None:
    if options.pop("short_secret", False):
        options["key_file"] = tmp_path / "short"
        options["key_file"].write_text("too short")
    if options.pop("bad_pem", False):
        options["key_file"] = tmp_path / "bad.pem"
        options["key_file"].write_text(
            "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
        )
    if options.pop("bad_jwks", False):
        options["key_file"] = tmp_path / "bad.json"
        options["key_file"].write_text('{"keys": [{"kty": "nope"}]}')
    mode = options.pop("mode")
    with pytest.raises(HandshakeConfigError, match=why):
        Handshakes(mode, **options)
