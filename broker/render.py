"""Fill in the Mosquitto configuration and ACL templates that ship in this package.

Both templates use the same small rules, so a user can read them as plain Mosquitto files:
on setting lines ``{name}`` placeholders are filled with ``str.format``; comment lines are
copied unchanged; lines between ``#%if NAME`` and ``#%endif`` are kept only when NAME is on.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgefl.atomic import write_atomic
from edgefl.config import check_name

from .limits import DEFAULT_LIMITS

CONFIG_TEMPLATE = "mosquitto.conf.template"
ACL_TEMPLATE = "acl.template"

# File names inside a broker's working directory; PrivateBroker, serve() and enroll() agree on
# these so that tools can find a deployment's files from its directory alone.
CONFIG_FILE = "mosquitto.conf"
PASSWORD_FILE = "passwords"
ACL_FILE = "acl"
LOG_FILE = "mosquitto.log"
PERSISTENCE_DIR = "persistence"
# the dynamic-security plugin's own file: it holds the quarantined devices (broker/quarantine.py)
DYNSEC_FILE = "dynamic-security.json"


@dataclass
class MosquittoSettings:
    """The values the configuration template needs; the defaults suit a deployment."""

    password_file: str
    acl_file: str
    persistence_location: str
    log_file: str
    port: int = 1883
    # the address of every listener, unless plain_bind gives the plain one its own
    bind: str = "0.0.0.0"
    plain_bind: str | None = None
    # False leaves the plain listener out altogether (only with TLS: else nothing listens)
    plain: bool = True
    user: str = "mosquitto"
    # broker/limits.py derives both from the fleet's model; these defaults suit mlp_digits
    max_packet_size: int = DEFAULT_LIMITS.max_packet_size
    autosave_interval: int = 60
    persistent_client_expiration: str = "7d"
    max_queued_messages: int = 10000
    max_queued_bytes: int = DEFAULT_LIMITS.max_queued_bytes
    max_inflight_messages: int = 0
    max_inflight_bytes: int = DEFAULT_LIMITS.max_queued_bytes
    # the dynamic-security plugin (None: Mosquitto has none; quarantines then stay inside the
    # aggregator) and its file
    dynsec_plugin: str | None = None
    dynsec_file: str | None = None
    tls_port: int = 8883
    tls_cafile: str | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    log_stderr: bool = False

    @property
    def tls(self) -> bool:
        given = [self.tls_cafile, self.tls_certfile, self.tls_keyfile]
        if any(given) and not all(given):
            raise ValueError("TLS needs all three of tls_cafile, tls_certfile and tls_keyfile")
        return all(given)


def template_text(name: str) -> str:
    """The text of a template shipped in this package."""
    return resources.files("broker").joinpath(name).read_text(encoding="utf-8")


def render(text: str, values: dict[str, Any], switches: dict[str, bool]) -> str:
    """Apply the template rules in the module docstring to ``text``."""
    out: list[str] = []
    keep: list[bool] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#%if "):
            name = stripped[5:].strip()
            if name not in switches:
                raise KeyError(f"template line {number}: unknown switch {name!r}")
            keep.append(switches[name])
            continue
        if stripped == "#%endif":
            if not keep:
                raise ValueError(f"template line {number}: #%endif without #%if")
            keep.pop()
            continue
        if not all(keep):
            continue
        out.append(line if stripped.startswith("#") else line.format_map(values))
    if keep:
        raise ValueError("template ends inside an #%if block")
    return "\n".join(out) + "\n"


def render_config(settings: MosquittoSettings) -> str:
    """The ``mosquitto.conf`` text for ``settings``."""
    values = asdict(settings)
    for key in (
        "password_file",
        "acl_file",
        "persistence_location",
        "log_file",
        "tls_cafile",
        "tls_certfile",
        "tls_keyfile",
        "dynsec_plugin",
        "dynsec_file",
    ):
        if values[key] is not None:
            _check_path(key, values[key])
    # Mosquitto appends the database name to this string as it is.
    if not values["persistence_location"].endswith("/"):
        values["persistence_location"] += "/"
    values["plain_bind"] = settings.plain_bind or settings.bind
    for key in ("bind", "plain_bind"):
        _check_address(key, values[key])
    if not settings.plain and not settings.tls:
        raise ValueError("the plain listener can be left out only when TLS is on")
    if (settings.dynsec_plugin is None) != (settings.dynsec_file is None):
        raise ValueError("the dynamic-security plugin needs both dynsec_plugin and dynsec_file")
    switches = {
        "tls": settings.tls,
        "plain": settings.plain,
        "log_stderr": settings.log_stderr,
        "dynsec": settings.dynsec_plugin is not None,
    }
    return render(template_text(CONFIG_TEMPLATE), values, switches)


def render_acl(
    fleet: str,
    aggregator_user: str = "aggregator",
    monitor_user: str = "monitor",
    admin_user: str = "admin",
) -> str:
    """The ACL text for ``fleet``."""
    check_name("fleet", fleet)
    values = {
        "fleet": fleet,
        "aggregator_user": aggregator_user,
        "monitor_user": monitor_user,
        "admin_user": admin_user,
    }
    return render(template_text(ACL_TEMPLATE), values, {})


def broker_user() -> str:
    """The user to name in ``user``: ``mosquitto`` (or Mosquitto's fallback) when run as root.

    When not root the setting has no effect, so the current user is named to keep the file
    truthful.
    """
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("mosquitto", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("neither a 'mosquitto' nor a 'nobody' user exists for Mosquitto to run as")


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file in one rename, so a reloading broker never reads half of it."""
    write_atomic(path, text, mode=mode)


def _check_path(key: str, value: str) -> None:
    # Mosquitto's configuration has no quoting: a path with a line break or a leading or
    # trailing space would be read as a different path.
    if "\n" in value or "\r" in value or value != value.strip() or not value:
        raise ValueError(f"{key} {value!r} cannot be written into mosquitto.conf")


def _check_address(key: str, value: str) -> None:
    # One word on the listener line: anything with a space or a line break would become other
    # settings, or another address than the one asked for.
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{key} {value!r} is not an address Mosquitto can listen on")
