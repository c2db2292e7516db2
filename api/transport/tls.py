"""TLS and mutual TLS from PEM files, for the server and for clients such as `conntrack-api get`."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A certificate or key file is missing or unreadable, or the set of files is incomplete."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if not data.strip():
        raise TlsConfigError(f"{what} {path} is empty")
    return data


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's certificate chain and key; with client_ca_file, clients must present a
    certificate signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @classmethod
    def from_files(
        cls, cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
    ) -> ServerTls | None:
        """None when no file is configured (plaintext); an error for a half configuration."""
        if cert_file is None and key_file is None:
            if client_ca_file is not None:
                raise TlsConfigError("a client CA (mutual TLS) needs a server certificate and key")
            return None
        if cert_file is None or key_file is None:
            raise TlsConfigError("TLS needs both a certificate file and a key file")
        return cls(cert_file, key_file, client_ca_file)

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        key = _read(self.key_file, "TLS key file")
        cert = _read(self.cert_file, "TLS certificate file")
        ca = _read(self.client_ca_file, "client CA file") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same files for an HTTPS listener (the REST mapping, api/transport/rest.py)."""
        _read(self.key_file, "TLS key file")
        _read(self.cert_file, "TLS certificate file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                _read(self.client_ca_file, "client CA file")
                context.load_verify_locations(self.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as exc:
            raise TlsConfigError(f"unusable TLS certificate, key or client CA: {exc}") from exc
        return context


def client_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials trusting ca_file (system roots if None), presenting a client
    certificate when both cert_file and key_file are given."""
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("a client certificate needs both a certificate file and a key file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA file") if ca_file else None,
        private_key=_read(key_file, "client key file") if key_file else None,
        certificate_chain=_read(cert_file, "client certificate file") if cert_file else None,
    )
