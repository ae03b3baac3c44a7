"""``python -m broker``: run, prepare or enrol into a deployment's broker without the edgefl CLI.

Useful on a broker host that has only this package, and as the reference for ``edgefl broker``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .serve import enroll, prepare, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "render the configuration and run Mosquitto in the foreground"),
        ("prepare", "only render the configuration (e.g. for a system Mosquitto)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--fleet", required=True)
        p.add_argument("--workdir", required=True, help="where the broker's files live")
        p.add_argument("--port", type=int, default=1883)
        p.add_argument("--bind", default="0.0.0.0")
        p.add_argument("--tls-ca")
        p.add_argument("--tls-cert")
        p.add_argument("--tls-key")
        p.add_argument("--tls-port", type=int, default=8883)
        p.add_argument("--plain-bind", help="address of the plain listener (default: --bind)")
        p.add_argument("--no-plain", action="store_true", help="TLS listener only")
    p = sub.add_parser("enroll", help="create device accounts; prints each device's password")
    p.add_argument("--workdir", required=True)
    p.add_argument("device_ids", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "enroll":
        for device_id in args.device_ids:
            account = enroll(args.workdir, device_id)
            print(f"{account.username} {account.password}")
        return 0
    options = (
        args.fleet,
        args.workdir,
        args.port,
        args.bind,
        args.tls_ca,
        args.tls_cert,
        args.tls_key,
        args.tls_port,
    )
    if args.command == "prepare":
        print(prepare(*options, plain_bind=args.plain_bind, plain=not args.no_plain))
        return 0
    return serve(*options, plain_bind=args.plain_bind, plain=not args.no_plain)


if __name__ == "__main__":
    sys.exit(main())
