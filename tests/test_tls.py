"""TLS with a certificate generated in the test: server-only TLS and mutual TLS with client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from conftest import start_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lstmserve.cli import main
from lstmserve.client import Client, LstmServeError
from lstmserve.server.config import TlsFiles


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(tmp: Path, stem: str, subject: str, issuer_key: ec.EllipticCurvePrivateKey | None = None,
           issuer: x509.Name | None = None, *, ca: bool = False) -> tuple[Path, Path, ec.EllipticCurvePrivateKey, x509.Name]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    cert_path, key_path = tmp / f"{stem}.crt", tmp / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, key, _name(subject)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca_cert, _, ca_key, ca_name = _issue(tmp, "ca", "lstmserve test CA", ca=True)
    server_cert, server_key, _, _ = _issue(tmp, "server", "localhost", ca_key, ca_name)
    client_cert, client_key, _, _ = _issue(tmp, "client", "test client", ca_key, ca_name)
    return {"ca": ca_cert, "server_cert": server_cert, "server_key": server_key,
            "client_cert": client_cert, "client_key": client_key}  # fmt: skip


def test_server_tls(token_model: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    handle = start_server(token_model, tls=TlsFiles(cert=pki["server_cert"], key=pki["server_key"]))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with Client(handle.address, credentials=credentials) as client, client.session() as session:
            assert session.step([1, 2]).step == 2
        with Client(handle.address, timeout=2) as plaintext, pytest.raises(LstmServeError):
            plaintext.model_info()  # a plaintext client cannot talk to a TLS server
        assert main(["health", "--target", handle.address, "--tls-ca-file", str(pki["ca"])]) == 0
        assert main(["info", "--target", handle.address, "--tls-ca-file", str(pki["ca"])]) == 0
        capsys.readouterr()
    finally:
        handle.stop()


def test_mutual_tls_requires_a_client_certificate(token_model: Path, pki: dict[str, Path]) -> None:
    tls = TlsFiles(cert=pki["server_cert"], key=pki["server_key"], client_ca=pki["ca"])
    handle = start_server(token_model, tls=tls)
    try:
        ca = pki["ca"].read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=pki["client_key"].read_bytes(), certificate_chain=pki["client_cert"].read_bytes()
        )
        with Client(handle.address, credentials=with_cert) as client:
            assert client.model_info().kind == "tokens"
        without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        with Client(handle.address, credentials=without_cert, timeout=2) as client, pytest.raises(LstmServeError):
            client.model_info()
    finally:
        handle.stop()
