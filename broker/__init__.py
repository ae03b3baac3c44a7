"""The MQTT broker tier: Mosquitto configuration, accounts and a private broker for local runs.

See broker/README.md for the files and for running the broker of a deployment.
"""

from .credentials import (
    RESERVED_USERNAMES,
    Account,
    add_account,
    add_accounts,
    generate_password,
    hash_password,
    read_password_file,
    remove_account,
    verify_password,
    write_password_file,
)
from .private import BrokerError, PrivateBroker, find_mosquitto, free_port, mqtt_login_ok
from .render import MosquittoSettings, render_acl, render_config
from .serve import enroll, prepare, serve

__all__ = [
    "RESERVED_USERNAMES",
    "Account",
    "BrokerError",
    "MosquittoSettings",
    "PrivateBroker",
    "add_account",
    "add_accounts",
    "enroll",
    "find_mosquitto",
    "free_port",
    "generate_password",
    "hash_password",
    "mqtt_login_ok",
    "prepare",
    "read_password_file",
    "remove_account",
    "render_acl",
    "render_config",
    "serve",
    "verify_password",
    "write_password_file",
]
