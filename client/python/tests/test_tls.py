"""https:// from Python: a storaged with TLS and required client
certificates (made here with openssl(1)), reached with
storaged.Client(url, ca=, cert=, key=), and a MapDataset whose pickled
connection (what a spawned DataLoader worker gets) keeps the files."""

import pickle
import subprocess

import pytest

import storaged
import storaged.torch as st
from conftest import Daemon, pattern, write_tree


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def signed(d, name, ext):
    """A P-256 key and a certificate for CN=name signed by the CA in d."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture
def tls_daemon(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test-ca", "-days", "2", cwd=d)
    server = signed(d, "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = signed(d, "py-client", "extendedKeyUsage=clientAuth\n")
    config = tmp_path / "storaged.toml"
    config.write_text(
        f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\ntls_client_ca = "{d / "ca.pem"}"\n\n'
        '[[tenant]]\nname = "py"\ncert_names = ["py-client"]\nread = [""]\nwrite = [""]\n'
    )
    daemon = Daemon(tmp_path / "data", extra=["--config", str(config)])
    https = daemon.url.replace("http://", "https://")
    src = tmp_path / "src"
    write_tree(src, {"a": pattern(7, 5000), "b": pattern(8, 70000)})
    subprocess.run(
        [str(daemon_bin("storagectl")), "--server", https, "--transport", "as-given",
         "--ca", str(d / "ca.pem"), "--cert", str(client[0]), "--key", str(client[1]),
         "ingest", "ds", str(src)],
        check=True, capture_output=True,
    )
    yield https, d / "ca.pem", client
    daemon.stop()


def daemon_bin(name):
    from conftest import BIN
    return BIN / name


def test_https_with_a_client_certificate(tls_daemon):
    # Guards against https:// being refused or sent in the clear from
    # Python, and against workers losing the TLS files.
    url, ca, (cert, key) = tls_daemon
    client = storaged.Client(url, transport="as-given", ca=str(ca), cert=str(cert), key=str(key))
    assert [d["name"] for d in client.datasets()] == ["ds"]
    assert bytes(client.dataset("ds").read("b")) == pattern(8, 70000)
    assert [str(p) for p in client.tls] == [str(ca), str(cert), str(key)]

    ds = st.MapDataset(client, "ds")
    again = pickle.loads(pickle.dumps(ds))
    assert bytes(again[0].data) == pattern(7, 5000)

    # Without a client certificate, or without the CA, nothing is served.
    with pytest.raises(Exception):
        storaged.Client(url, transport="as-given", ca=str(ca)).datasets()
    with pytest.raises(Exception, match="CA"):
        storaged.Client(url, transport="as-given")
