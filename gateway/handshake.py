"""Who is connecting: the principal and labels the reference gateway takes from a WebSocket
handshake before it accepts the socket (docs/gateway.md, "Who is connecting").

- `jwt`: a bearer token, from the `Authorization: Bearer` header or, for browsers (which
  cannot set headers on a WebSocket), the `access_token` query parameter; verified with the
  configured key (an HS256 shared secret, an RS256 or ES256 PEM public key, or a JWKS file whose
  keys are chosen by the token's `kid`), its `exp` (and `nbf`, `iat`) honoured, its audience and
  issuer checked when configured. The algorithm is the key's, never the token's: a token that
  names another (`none` included) is refused. The principal is the configured claim.
- `header`: a trusted proxy in front of the gateway authenticated the caller and names it in a
  header; a request without it is refused.
- labels come from claims, headers or query parameters, as configured.

A refused handshake gets an HTTP error (401 for a missing or bad credential, 400 for a label the
events cannot carry) and no socket, so no event is published for it.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conntrack.core.labels import Labels, label_key_problem, labels_problem, principal_problem

log = logging.getLogger(__name__)

Source = Literal["claim", "header", "query"]
_SOURCES: Final = ("claim", "header", "query")
MIN_HMAC_SECRET_BYTES: Final = 32
_CURVES: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class HandshakeRefused(Exception):
    """The handshake is refused with this HTTP status; the message is the response body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class HandshakeConfigError(ValueError):
    """The gateway's identity settings cannot work (the message names the setting)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a handshake is for ("": nobody named) and the connection's labels."""

    principal: str = ""
    labels: Labels = ()


NOBODY: Final = Identity()


@dataclass(frozen=True, slots=True)
class LabelSource:
    key: str
    source: Source
    name: str


def parse_label_sources(spec: str) -> tuple[LabelSource, ...]:
    """`tenant=claim:tid,device=header:X-Device` as LabelSources; HandshakeConfigError."""
    out: list[LabelSource] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, rest = part.partition("=")
        source, colon, name = rest.partition(":")
        key, source, name = key.strip(), source.strip(), name.strip()
        if not eq or not colon or not name or source not in _SOURCES:
            raise HandshakeConfigError(
                f"gateway_labels: {part!r} is not key=source:name with source claim, header or "
                "query"
            )
        problem = label_key_problem("gateway_labels", key)
        if problem:
            raise HandshakeConfigError(problem)
        if any(s.key == key for s in out):
            raise HandshakeConfigError(f"gateway_labels names the label {key!r} twice")
        out.append(LabelSource(key, source, name))  # type: ignore[arg-type]
    return tuple(out)


class _Keys:
    """The verification key(s) of a key file and the algorithm each one allows."""

    def __init__(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise HandshakeConfigError(
                f"gateway_jwt_key_file {path}: {exc.strerror or exc}"
            ) from None
        self._by_kid: dict[str | None, tuple[Any, str]] = {}
        text = raw.strip()
        if text.startswith(b"{"):
            self._load_jwks(path, text)
        elif text.startswith(b"-----BEGIN"):
            self._load_pem(path, text)
        else:
            if len(text) < MIN_HMAC_SECRET_BYTES:
                raise HandshakeConfigError(
                    f"gateway_jwt_key_file {path}: an HS256 secret must be at least "
                    f"{MIN_HMAC_SECRET_BYTES} bytes, got {len(text)}"
                )
            self._by_kid[None] = (text, "HS256")

    def _load_pem(self, path: Path, text: bytes) -> None:
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise HandshakeConfigError(
                f"gateway_jwt_key_file {path}: not a PEM public key ({exc})"
            ) from None
        if isinstance(key, rsa.RSAPublicKey):
            self._by_kid[None] = (key, "RS256")
        elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
            self._by_kid[None] = (key, _CURVES[key.curve.name])
        else:
            raise HandshakeConfigError(
                f"gateway_jwt_key_file {path}: an RSA or EC (P-256, P-384, P-521) public key is "
                f"needed, got {type(key).__name__}"
            )

    def _load_jwks(self, path: Path, text: bytes) -> None:
        try:
            keys = jwt.PyJWKSet.from_json(text.decode()).keys
        except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
            raise HandshakeConfigError(
                f"gateway_jwt_key_file {path}: not a usable JWKS ({exc})"
            ) from None
        for k in keys:
            self._by_kid[k.key_id] = (k.key, k.algorithm_name)

    def for_token(self, token: str) -> tuple[Any, str]:
        """The key and algorithm to verify this token with (HandshakeRefused if none)."""
        if None in self._by_kid and len(self._by_kid) == 1:
            return self._by_kid[None]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, f"invalid token: {exc}") from None
        found = self._by_kid.get(kid)
        if found is None and kid is None and len(self._by_kid) == 1:
            found = next(iter(self._by_kid.values()))
        if found is None:
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid token: unknown key id")
        return found


class Handshakes:
    """Turns a handshake's request into an Identity, or refuses it (HandshakeRefused)."""

    def __init__(
        self,
        mode: Literal["none", "jwt", "header"] = "none",
        *,
        key_file: Path | None = None,
        principal_claim: str = "sub",
        audience: str | None = None,
        issuer: str | None = None,
        principal_header: str = "X-Authenticated-User",
        labels: str = "",
    ) -> None:
        """Raises HandshakeConfigError for settings that cannot work, before any client comes."""
        self._mode = mode
        self._sources = parse_label_sources(labels)
        if mode != "jwt" and any(s.source == "claim" for s in self._sources):
            raise HandshakeConfigError("gateway_labels takes claims only with gateway_auth=jwt")
        self._keys: _Keys | None = None
        if mode == "jwt":
            if key_file is None:
                raise HandshakeConfigError("gateway_auth=jwt needs gateway_jwt_key_file")
            self._keys = _Keys(key_file)
        self._claim = principal_claim
        self._audience = audience
        self._issuer = issuer
        self._header = principal_header

    @property
    def mode(self) -> str:
        return self._mode

    def identify(self, headers: Mapping[str, str], path: str) -> Identity:
        """The Identity of a handshake with these request headers and request path (with its
        query string). Raises HandshakeRefused."""
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        claims: dict[str, Any] = {}
        principal = ""
        if self._mode == "jwt":
            claims = self._verified_claims(headers, query)
            value = claims.get(self._claim)
            if not isinstance(value, str) or not value:
                raise HandshakeRefused(
                    HTTPStatus.UNAUTHORIZED, f"the token has no {self._claim!r} claim (a string)"
                )
            principal = value
        elif self._mode == "header":
            principal = headers.get(self._header, "")
            if not principal:
                raise HandshakeRefused(
                    HTTPStatus.UNAUTHORIZED, f"the {self._header} header is missing"
                )
        problem = principal_problem("principal", principal)
        if problem:
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, problem)
        labels = self._labels(claims, headers, query)
        return Identity(principal, labels) if principal or labels else NOBODY

    def _verified_claims(self, headers: Mapping[str, str], query: dict[str, str]) -> dict[str, Any]:
        assert self._keys is not None
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else query.get("access_token", "")
        if not token:
            raise HandshakeRefused(
                HTTPStatus.UNAUTHORIZED,
                "a bearer token is required (Authorization header or access_token parameter)",
            )
        key, algorithm = self._keys.for_token(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, f"invalid token: {exc}") from None
        return claims

    def _labels(
        self, claims: Mapping[str, Any], headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Labels:
        pairs: list[tuple[str, str]] = []
        for s in self._sources:
            value: object
            if s.source == "claim":
                value = claims.get(s.name)
            elif s.source == "header":
                value = headers.get(s.name)
            else:
                value = query.get(s.name)
            if value is None:
                continue  # not given: no such label
            if isinstance(value, bool):
                value = json.dumps(value)
            elif not isinstance(value, str | int | float):
                raise HandshakeRefused(
                    HTTPStatus.BAD_REQUEST,
                    f"label {s.key!r}: the {s.source} {s.name!r} is not a string or a number",
                )
            pairs.append((s.key, str(value)))
        labels = tuple(sorted(pairs))
        problem = labels_problem("labels", labels)
        if problem:
            raise HandshakeRefused(HTTPStatus.BAD_REQUEST, problem)
        return labels
