"""Certificates for a fedcredit federation: a CA and the server certificates it signs.

Why generate instead of shipping fixtures: certificates expire, and a private key committed to
the repo would be copied into real deployments sooner or later. EC P-256 keeps it fast. The
extensions (SKI/AKI, key usages, CA basic constraints) are what strict verifiers (Python >=
3.13's VERIFY_X509_STRICT, grpc/BoringSSL) demand. ``fedcredit deploy init`` and the test
harness (``tests/deployment.py``) both use this module, so the certificates a try-out runs on
are the ones the tests exercise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a CA and of a server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA in memory (its key signs the federation's server certificates)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def name(self) -> x509.Name:
        return self.cert.subject

    def ski(self) -> x509.SubjectKeyIdentifier:
        return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())


def write_private_pem(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    """Write an unencrypted PKCS#8 key, created with mode 0600 (never world-readable)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, data)


def write_secret(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with mode 0600 from the first byte (no umask window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(0o600)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures for both; certificate and CRL signing only for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(days: float) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(common_name: str = "fedcredit test CA", *, days: float = 2) -> CertificateAuthority:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    not_before, not_after = _validity(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def issue_server_cert(
    ca: CertificateAuthority,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    *,
    common_name: str = "localhost",
    days: float = 2,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (IP addresses and DNS names), signed by ``ca``."""
    not_before, not_after = _validity(days)
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.ski()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def write_cert(cert: x509.Certificate, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_server_files(
    ca: CertificateAuthority,
    cert_path: Path,
    key_path: Path,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    *,
    common_name: str = "localhost",
    days: float = 2,
) -> None:
    """Issue a server certificate and write it (0644) and its key (0600)."""
    key, cert = issue_server_cert(ca, hosts, common_name=common_name, days=days)
    write_cert(cert, cert_path)
    write_private_pem(key, key_path)


def make_tls_files(directory: Path, hosts: Iterable[str] = DEFAULT_HOSTS) -> TlsFiles:
    """Create a throwaway CA (2 days) and a server certificate valid for ``hosts``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    write_cert(ca.cert, files.ca_cert)
    write_server_files(ca, files.server_cert, files.server_key, hosts)
    return files


def verify_signed_by(cert_path: Path, ca_path: Path) -> x509.Certificate:
    """Check that ``cert_path`` was issued and signed by the CA in ``ca_path`` (raises if not)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    return cert
