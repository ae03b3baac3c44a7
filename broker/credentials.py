"""Mosquitto password files, written from Python.

Mosquitto 2.0 stores each account as one line ``username:$7$<iterations>$<salt>$<hash>``:
PBKDF2-HMAC-SHA512 over the password with a 12-byte random salt, 101 iterations, salt and the
64-byte derived key in standard base64. That is the format ``mosquitto_passwd`` 2.0 writes and
the broker checks (verified against Mosquitto 2.0.11 by connecting with the result). Hashing
here, rather than calling ``mosquitto_passwd``, means enrolment works where only the broker is
installed and creating a thousand simulated devices takes milliseconds, not a thousand spawns.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefl.atomic import write_atomic

log = logging.getLogger(__name__)

HASH_ID = "7"
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
# Accounts with a role of their own; a device id may not take one of these names, or the
# device would inherit that role's rights.
RESERVED_USERNAMES = frozenset({"aggregator", "monitor", "admin"})


@dataclass(frozen=True)
class Account:
    """A broker login. The password is kept out of ``repr`` so it never lands in a log."""

    username: str
    password: str = field(repr=False)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The password-file hash of ``password`` (``$7$101$salt$hash``); a fresh salt unless given."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return "${}${}${}${}".format(
        HASH_ID,
        PBKDF2_ITERATIONS,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(key).decode("ascii"),
    )


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash from a password file."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != HASH_ID:
        raise ValueError("not a Mosquitto $7$ password hash")
    iterations = int(parts[2])
    salt = base64.b64decode(parts[3])
    expected = base64.b64decode(parts[4])
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(key, expected)


def generate_password(nbytes: int = 24) -> str:
    """A random password (URL-safe text, ``nbytes`` of entropy) that needs no quoting anywhere."""
    return secrets.token_urlsafe(nbytes)


def read_password_file(path: str | Path) -> dict[str, str]:
    """The entries of a password file as ``{username: hash}``; a missing file has none."""
    entries: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        line = line.strip()
        # Mosquitto skips blank lines and comments too; keep the file's meaning the same.
        if not line or line.startswith("#"):
            continue
        username, sep, encoded = line.partition(":")
        if sep:
            entries[username] = encoded
    return entries


def write_password_file(path: str | Path, accounts: Mapping[str, str]) -> None:
    """Replace the file at ``path`` with one entry per ``{username: password}``.

    The passwords are hashed here. The write is atomic (temporary file, then rename), so a
    broker reloading at the same moment reads either the old file or the new one.
    """
    _write_entries(Path(path), {u: hash_password(p) for u, p in _checked(accounts).items()})


def add_accounts(path: str | Path, accounts: Mapping[str, str]) -> None:
    """Add ``{username: password}`` entries to a password file, replacing same-named ones."""
    path = Path(path)
    entries = read_password_file(path)
    entries.update({u: hash_password(p) for u, p in _checked(accounts).items()})
    _write_entries(path, entries)


def add_account(path: str | Path, username: str, password: str) -> None:
    """Add one account to a password file, replacing an existing entry of that name."""
    add_accounts(path, {username: password})


def remove_account(path: str | Path, username: str) -> bool:
    """Remove an account; returns whether it was there."""
    path = Path(path)
    entries = read_password_file(path)
    if entries.pop(username, None) is None:
        return False
    _write_entries(path, entries)
    return True


def _checked(accounts: Mapping[str, str]) -> Mapping[str, str]:
    for username, password in accounts.items():
        # ':' separates the fields and a line break ends the entry: either would corrupt the file.
        if not username or any(c in username for c in ":\r\n") or username != username.strip():
            raise ValueError(f"username {username!r} cannot be stored in a password file")
        if not password:
            raise ValueError(f"account {username!r} needs a non-empty password")
    return accounts


def _write_entries(path: Path, entries: Mapping[str, str]) -> None:
    body = "".join(f"{u}:{h}\n" for u, h in entries.items())
    # 0600: only the broker's own user should read hashes; a root-run tool rewriting the file
    # that a privilege-dropped broker (user "mosquitto") reads hands it back to that user
    write_atomic(path, body, mode=0o600, owner_of=path)
    log.debug("wrote %d account(s) to %s", len(entries), path)
