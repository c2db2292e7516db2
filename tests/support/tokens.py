"""Keys and JWTs for the gateway's handshake tests: an RSA and an EC key pair written as PEM
files, a JWKS of both, an HS256 secret, and tokens signed with any of them."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

HS_SECRET = b"a-shared-secret-of-at-least-32-bytes!!"


@dataclass(frozen=True)
class Keys:
    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey
    other_rsa_private: rsa.RSAPrivateKey  # a key the gateway does not know
    rsa_pem: Path
    ec_pem: Path
    jwks: Path
    hs_secret: Path


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_keys(directory: Path) -> Keys:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem, ec_pem = directory / "rsa.pem", directory / "ec.pem"
    rsa_pem.write_bytes(_public_pem(rsa_key))
    ec_pem.write_bytes(_public_pem(ec_key))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    jwks = directory / "jwks.json"
    jwks.write_text(
        json.dumps(
            {
                "keys": [
                    rsa_jwk | {"kid": "rsa-1", "alg": "RS256", "use": "sig"},
                    ec_jwk | {"kid": "ec-1", "alg": "ES256", "use": "sig"},
                ]
            }
        )
    )
    secret = directory / "hs.secret"
    secret.write_bytes(HS_SECRET + b"\n")
    return Keys(rsa_key, ec_key, other, rsa_pem, ec_pem, jwks, secret)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300} | extra


def sign(payload: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned(payload: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def hs256_with_public_key(payload: dict[str, Any], public_pem: Path) -> str:
    """The classic algorithm confusion: HS256 keyed with the RSA public key's PEM text."""
    import hashlib
    import hmac

    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(payload)
    mac = hmac.new(public_pem.read_bytes(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
