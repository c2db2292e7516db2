"""Bearer-token authentication as upstream clients send it: `authorization: Bearer <token>`.

Tokens are compared in constant time and never logged; only their count is."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

BEARER_PREFIX = "bearer "


class TokenConfigError(ValueError):
    """The configured tokens are unusable (e.g. the token file is missing or empty)."""


def load_tokens(inline: str | None, file: Path | None) -> tuple[str, ...]:
    """Tokens from a comma-separated string and/or a file with one token per line (blank lines
    and lines starting with # are ignored). Both empty means authentication is off."""
    tokens: list[str] = []
    if inline:
        tokens.extend(t.strip() for t in inline.split(","))
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise TokenConfigError(f"cannot read token file {file}: {exc.strerror}") from exc
        tokens.extend(line.strip() for line in lines if not line.lstrip().startswith("#"))
        if not any(tokens):
            raise TokenConfigError(f"token file {file} holds no token")
    tokens = [t for t in tokens if t]
    for token in tokens:
        if any(c.isspace() or not c.isprintable() for c in token) or not token.isascii():
            # Metadata values are printable ASCII; such a token could never match.
            raise TokenConfigError("tokens must be printable ASCII without whitespace")
    return tuple(dict.fromkeys(tokens))


class BearerTokens:
    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise TokenConfigError("at least one token is required")
        self._tokens = tuple(t.encode() for t in tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"BearerTokens(<{len(self._tokens)} redacted>)"

    def accepts(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """True if the `authorization` metadata carries one of the tokens."""
        presented = _bearer(metadata)
        if presented is None:
            return False
        matched = False
        # Compare with every token, so timing reveals neither the token nor which one matched.
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        if value[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return value[len(BEARER_PREFIX) :].strip().encode()
    return None
