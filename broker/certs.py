"""A certificate authority and a server certificate for the broker's TLS listener.

For a fleet that has no PKI of its own: ``edgefl certs --dir DIR --host broker.lan`` makes

    DIR/ca.crt       give this to every device (``[broker] tls_ca``): it is how a device knows
                     it talks to your broker and not to an impostor
    DIR/ca.key       keep it offline; it signs server certificates
    DIR/server.crt   the broker's certificate, valid for the names and addresses given
    DIR/server.key   the broker's private key (mode 0600)

with the ``openssl`` command (present on Debian and Raspberry Pi OS). To bring your own, point
``edgefl broker --tls-ca/--tls-cert/--tls-key`` at your files instead; the server certificate
must name the host the devices connect to (subjectAltName), or they will refuse it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DAYS_CA = 3650
DAYS_SERVER = 825  # the longest validity that common TLS clients accept


class CertError(RuntimeError):
    pass


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("the openssl command is not installed (apt-get install openssl)")
    out = subprocess.run([exe, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {out.stderr.strip()[-500:]}")


def make_certificates(
    out_dir: str | Path, hosts: Iterable[str], common_name: str = "edgefl broker"
) -> dict[str, Path]:
    """Create (or keep, if present) a CA, and issue a server certificate for ``hosts``
    (DNS names and IP addresses). Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}" for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    hosts = list(dict.fromkeys(hosts)) or ["localhost"]
    san = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            san.append(f"IP:{h}")
        except ValueError:
            san.append(f"DNS:{h}")
    old = os.umask(0o077)  # private keys are born private
    try:
        if not (paths["ca.crt"].exists() and paths["ca.key"].exists()):
            _openssl(
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(paths["ca.key"]),
                "-out",
                str(paths["ca.crt"]),
                "-days",
                str(DAYS_CA),
                "-subj",
                "/CN=edgefl fleet CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            )
        with tempfile.TemporaryDirectory() as tmp:
            csr = Path(tmp) / "server.csr"
            ext = Path(tmp) / "ext.cnf"
            ext.write_text(
                f"subjectAltName={','.join(san)}\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
            )
            _openssl(
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(paths["server.key"]),
                "-out",
                str(csr),
                "-subj",
                f"/CN={common_name}",
            )
            _openssl(
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(paths["ca.crt"]),
                "-CAkey",
                str(paths["ca.key"]),
                "-CAcreateserial",
                "-out",
                str(paths["server.crt"]),
                "-days",
                str(DAYS_SERVER),
                "-extfile",
                str(ext),
            )
    finally:
        os.umask(old)
    for name in ("ca.crt", "server.crt"):
        paths[name].chmod(0o644)
    log.info("TLS certificates for %s in %s", ", ".join(hosts), out)
    return paths
