"""The ``edgefl`` command: the same programs a deployment runs, the operators' tools, and the
local demo; one subcommand each (``edgefl --help`` lists them from the parser below).

Errors a user can fix (edgefl/errors.py: a configuration that cannot work, a broker that refused
us, no model installed ...) are raised by the roles and turned into one line on standard error,
and the exit code, in one place: :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

from edgefl.config import (
    PARTITIONS,
    AggregatorConfig,
    BrokerConfig,
    ConfigError,
    DataConfig,
    DeviceConfig,
    RunConfig,
    check_name,
    load,
)
from edgefl.errors import UsageError, UserError

log = logging.getLogger("edgefl")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_SIGNAL = 130


def _version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    try:
        return package_version("edgefl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from edgefl import __version__

        return __version__


def _setup_logging(level: str, logfile: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(logfile)]
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        handlers=handlers,
    )


def _until_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so services shut down cleanly (birth/death intact)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


# -- edgefl aggregator ------------------------------------------------------------------------


def cmd_aggregator(args: argparse.Namespace) -> int:
    cfg = load(AggregatorConfig, args.config)  # first: a bad config fails before torch loads
    import torch

    from aggregator.main import run_service

    torch.set_num_threads(args.threads)
    return run_service(
        cfg,
        rounds=args.rounds,
        export=not args.no_export,
        deploy=not args.no_deploy,
        stop=_until_signal(),
    )


# -- edgefl device ----------------------------------------------------------------------------


def cmd_device(args: argparse.Namespace) -> int:
    configs = [load(DeviceConfig, path) for path in args.config]
    from concurrent.futures import ThreadPoolExecutor

    from device.agent import DeviceAgent, set_torch_threads

    set_torch_threads(configs[0].torch_threads)
    stop = _until_signal()
    # one executor for all agents of this process: each agent trains when its task comes, and
    # they may all be asked at once
    executor = ThreadPoolExecutor(min(len(configs), 64), thread_name_prefix="train")
    # bad or missing local data raises a configuration error (exit 2: systemd does not retry)
    agents = [DeviceAgent(c, executor=executor) for c in configs]
    for agent in agents:
        agent.start(wait=False)
    log.info("%d device agent(s) started", len(agents))
    # an agent whose account is refused or whose id another agent took has stopped for good:
    # the process ends with its error, so that systemd shows the unit failed and why
    failure = None
    while failure is None and not stop.wait(0.2):
        failure = next((a.failure for a in agents if a.failure is not None), None)
    for agent in agents:
        agent.stop()
    executor.shutdown(wait=False, cancel_futures=True)
    if args.stats_out:
        from edgefl.memory import peak_rss_mb

        stats = {
            "agents": len(agents),
            "peak_rss_mb": peak_rss_mb(),
            "updates_sent": sum(a.stats.updates_sent for a in agents),
            "uplink_bytes": sum(a.link.bytes_out["update"] for a in agents),
            "downlink_bytes": sum(sum(a.link.bytes_in.values()) for a in agents),
            "train_s": sum(a.stats.train_seconds for a in agents),
            "serving": {a.id: a.server.version for a in agents},
            # energy spent and battery levels (device/profiles.py), replies other than updates,
            # bytes of its updates (the run report, launch/report.py)
            "hardware": {a.id: a.hardware.report() | {"replies": a.stats.replies,
                         "uplink_bytes": a.link.bytes_out["update"]} for a in agents},
        }
        Path(args.stats_out).write_text(json.dumps(stats, indent=1))
    if failure is not None:
        raise failure
    return 0


# -- edgefl broker ----------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.limits import limits_for_model
    from broker.serve import serve

    return serve(
        fleet=args.fleet,
        workdir=args.dir,
        port=args.port,
        bind=args.bind,
        tls_cafile=args.tls_ca,
        tls_certfile=args.tls_cert,
        tls_keyfile=args.tls_key,
        tls_port=args.tls_port,
        plain_bind=args.plain_bind,
        plain=not args.no_plain,
        limits=limits_for_model(
            args.model, args.chunk_bytes, args.devices, max_packet_bytes=args.max_packet_bytes
        ),
    )


def cmd_enroll(args: argparse.Namespace) -> int:
    """Create device accounts on a deployment's broker, the config file for each device, and
    add the devices to the aggregator's list of enrolled devices."""
    from aggregator.enrolled import LIST_FILE, add_ids
    from broker.credentials import RESERVED_USERNAMES
    from broker.serve import enroll
    from edgefl.config import BrokerConfig, check_name, to_dict, to_toml

    # Every id is checked before anything is written, so a typo in the last one does not leave
    # the first ones half enrolled.
    check_name("fleet", args.fleet)
    for device_id in args.device_ids:
        check_name("device id", device_id)
        if device_id in RESERVED_USERNAMES:
            raise ConfigError(f"device id {device_id!r} is reserved for the {device_id} account")
    # A device that is given a CA talks TLS, and the broker's TLS listener is on 8883 unless
    # `edgefl broker --tls-port` moved it.
    port = args.port if args.port is not None else (8883 if args.tls_ca else 1883)
    registry = Path(args.registry) if args.registry else Path(args.dir) / LIST_FILE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for device_id in args.device_ids:
        account = enroll(args.dir, device_id)
        cfg = DeviceConfig(
            fleet=args.fleet,
            device_id=device_id,
            broker=BrokerConfig(
                host=args.host,
                port=port,
                username=account.username,
                password=account.password,
                tls_ca=args.tls_ca,
            ),
            # {id}: several devices on one machine each need their own data and state
            data=args.data.replace("{id}", device_id),
            state_dir=args.state_dir.replace("{id}", device_id),
        )
        path = out / f"{device_id}.toml"
        path.write_text(
            f"# edgefl device configuration for {device_id}; holds its broker password.\n"
            f"# Copy it to the device as /etc/edgefl/device.toml (mode 0640, root:edgefl).\n"
            + to_toml(to_dict(cfg))
        )
        path.chmod(0o600)
        print(f"enrolled {device_id}: {path}")
    # Last: a device with an account but not on the list is ignored by the aggregator, which
    # is the safe way round should this step fail.
    add_ids(registry, args.device_ids)
    print(
        f"added to the aggregator's list of enrolled devices: {registry}\n"
        f"(the aggregator's enrolled_devices must name this file; copy it there if the "
        f"aggregator runs on another machine)"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from broker.certs import make_certificates

    paths = make_certificates(args.dir, args.host)
    print(f"CA certificate (copy to every device, [broker] tls_ca): {paths['ca.crt']}")
    print(f"CA key (keep it offline):                              {paths['ca.key']}")
    print(
        f"broker: edgefl broker --tls-ca {paths['ca.crt']} --tls-cert {paths['server.crt']} "
        f"--tls-key {paths['server.key']}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Local inference with the deployed ONNX model (ONNX Runtime only; torch is not loaded)."""
    import numpy as np

    from device.inference import InferenceServer

    path = Path(args.input)
    for given, what in ((path, "input file"), (args.model and Path(args.model), "model file")):
        if given and not given.is_file():
            raise UsageError(f"{what} {given} does not exist (or is not a file)")
    if args.model:
        server = InferenceServer()
        server.load(args.model)
    else:
        server = InferenceServer.from_dir(args.model_dir)
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            X = z["X"]
            labels = z["y"] if "y" in z.files else None
    elif path.suffix == ".npy":
        X = np.load(path, allow_pickle=False)
    else:  # text: one sample per line, numbers separated by commas or spaces
        X = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    classes = server.predict(np.asarray(X, dtype=np.float32))
    # the fleet's file (fp32, int8) or the device's personal model (device/personal/serving.py)
    variant = server.info.get("variant")
    if args.json:
        print(
            json.dumps({"version": server.version, "variant": variant, "classes": classes.tolist()})
        )
    else:
        print("\n".join(str(c) for c in classes))
    if labels is not None:
        acc = float((classes == labels).mean())
        what = f"model v{server.version}" + (f" ({variant})" if variant else "")
        print(f"{what}: accuracy {acc:.4f} on {len(labels)} samples", file=sys.stderr)
    return 0


def _admin_broker(cfg: AggregatorConfig, secret: str) -> BrokerConfig:
    """The aggregator's broker address and TLS settings with the operators' admin account
    (its password in ``secret``: admin.secret in the broker's directory)."""
    try:
        password = Path(secret).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the admin password from {secret}: {e.strerror}") from None
    return dataclasses.replace(cfg.broker, username="admin", password=password)


def _admin_secret_argument(parser: argparse.ArgumentParser) -> None:
    """The operators' tools log in as the broker's admin account (never as the aggregator,
    whose connection and session they would take over)."""
    parser.add_argument(
        "--admin-secret",
        required=True,
        help="the admin account's password file (admin.secret in the broker's directory)",
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    from aggregator.deploy import rollback_command

    cfg = load(AggregatorConfig, args.config)
    result = rollback_command(cfg, _admin_broker(cfg, args.admin_secret), args.to, args.variant)
    print(
        f"rolled back to model v{result['version']} ({result['variant']}): served by "
        f"{result['devices_serving']} of {result['devices_online']} online devices after "
        f"{result['rollout_s']:.2f} s"
    )
    return 0 if result["devices_serving"] == result["devices_online"] else 1


def cmd_readmit(args: argparse.Namespace) -> int:
    """List quarantined devices, or lift the quarantine of some."""
    from edgefl import dynsec

    cfg = load(AggregatorConfig, args.config)
    admin = _admin_broker(cfg, args.admin_secret)
    if not args.device_ids:
        answers = dynsec.send(admin, dynsec.list_clients())
        found = dynsec.quarantined(answers[0]) if answers else {}
        for device_id, reason in sorted(found.items()):
            print(f"{device_id}\t{reason}")
        if not found:
            print("no device is quarantined")
        return 0
    failed = 0
    for device_id in args.device_ids:
        check_name("device id", device_id)
        answers = dynsec.send(admin, dynsec.readmit(device_id))
        error = answers[0].get("error") if answers else "no answer"
        if error:
            failed += 1
            print(f"{device_id}: not re-admitted: {error}", file=sys.stderr)
        else:
            print(f"{device_id}: re-admitted; it logs in with its own account again")
    return 1 if failed else 0


# -- edgefl status ----------------------------------------------------------------------------


def _monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """How the operators' tools (status, dashboard) reach the fleet: read by _monitor_broker."""
    parser.add_argument(
        "--config", help="the aggregator's TOML: fleet, broker address and TLS, enrolled list"
    )
    parser.add_argument("--fleet", help="the fleet (default: the config's)")
    parser.add_argument(
        "--host", help="the broker's address (default: the config's, or 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="the broker's port (default: the config's, or 1883)"
    )
    parser.add_argument("--tls-ca", help="CA certificate of the broker's TLS listener")
    parser.add_argument(
        "--monitor-secret",
        default="broker-data/monitor.secret",
        help="the read-only monitor account's password file (monitor.secret in the broker's "
        "directory; default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the broker"
    )


def _monitor_broker(args: argparse.Namespace) -> tuple[str, BrokerConfig, list[str]]:
    """The fleet, how to reach its broker as the read-only monitor account, and the enrolled
    ids, from the aggregator's config (if given) and the command line."""
    from aggregator.enrolled import read_ids

    cfg = load(AggregatorConfig, args.config) if args.config else None
    broker = cfg.broker if cfg else BrokerConfig()
    fleet = args.fleet or (cfg.fleet if cfg else None)
    if not fleet:
        raise ConfigError("name the fleet: --fleet NAME, or --config with the aggregator's TOML")
    check_name("fleet", fleet)
    try:
        password = Path(args.monitor_secret).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(
            f"cannot read the monitor password from {args.monitor_secret}: {e.strerror} "
            "(monitor.secret in the broker's directory; --monitor-secret FILE)"
        ) from None
    changes: dict[str, object] = {"username": "monitor", "password": password}
    for key in ("host", "port", "tls_ca"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    changes["connect_timeout_s"] = args.timeout
    enrolled: list[str] = []
    if cfg and cfg.enrolled_devices:
        try:
            enrolled = sorted(read_ids(cfg.enrolled_devices))
        except OSError as e:  # on another machine than the aggregator, say: not fatal
            print(f"edgefl {args.command}: enrolled_devices {cfg.enrolled_devices}: {e.strerror}; "
                  "showing the devices the broker knows", file=sys.stderr)
    return fleet, dataclasses.replace(broker, **changes), enrolled


def cmd_status(args: argparse.Namespace) -> int:
    """The fleet on one screen, from the broker's retained state (monitor/status.py)."""
    from monitor import status

    # a broker that cannot be reached or refuses the account is a UserError: main() says it
    fleet, broker, enrolled = _monitor_broker(args)
    if args.watch is None:
        snap = status.gather(fleet, broker, enrolled=enrolled, wait_s=args.wait)
        status.show(snap, sys.stdout, args.json)
    else:
        status.watch(
            fleet,
            broker,
            sys.stdout,
            every_s=args.watch,
            enrolled=enrolled,
            wait_s=args.wait,
            as_json=args.json,
            clear=sys.stdout.isatty() and not args.json,
        )
    return 0


# -- edgefl split -----------------------------------------------------------------------------


def cmd_split(args: argparse.Namespace) -> int:
    """Turn a data set into one data.npz per device and the aggregator's test.npz."""
    from edgefl.data import PartitionError
    from edgefl.data import split as sp

    try:
        source = sp.load_source(
            args.source,
            test_fraction=args.test_fraction,
            label_column=args.label_column,
            subject_column=args.subject_column,
        )
        ids = args.device_ids.split(",") if args.device_ids else sp.numbered_ids(args.devices)
        split = sp.split_fleet(
            source,
            ids,
            args.partition,
            alpha=args.alpha,
            seed=args.seed,
            min_samples=args.min_samples,
            shards_per_device=args.shards_per_device,
        )
        sp.write_split(split, args.out)
    except (ValueError, OSError) as e:  # the source, the options or the output: one line
        options = "--alpha, --min-samples, --devices, --partition"
        hint = f" (options: {options})" if isinstance(e, PartitionError) else ""
        print(f"edgefl split: {e}{hint}", file=sys.stderr)
        return 2
    print("\n".join(sp.summary(split, args.out)))
    return 0


# -- edgefl dashboard -------------------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    """A live, read-only web page of the fleet (monitor/dashboard.py)."""
    from edgefl.mqtt import BrokerUnavailable
    from monitor.dashboard import Dashboard
    from monitor.fleet import FleetView

    fleet, broker, enrolled = _monitor_broker(args)
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read the dashboard token from {args.token_file}: {e.strerror}"
            ) from None
    view = FleetView(fleet, broker, enrolled=enrolled)
    try:
        dashboard = Dashboard(view, args.bind, args.http_port, token=token)
    except OSError as e:
        print(f"edgefl dashboard: cannot listen on {args.bind}:{args.http_port}: {e.strerror} "
              "(another program there? choose another with --http-port)", file=sys.stderr)
        return 1
    stop = _until_signal()
    try:
        view.start()
    except BrokerUnavailable as e:
        dashboard.httpd.server_close()
        print(f"edgefl dashboard: {e}", file=sys.stderr)
        return 1
    with dashboard:
        shown = dashboard.url + ("?token=…" if token else "")
        print(f"dashboard of fleet {fleet}: {shown} (read-only; Ctrl-C stops it)")
        stop.wait()
    view.stop()
    return 0


# -- edgefl demo ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from launch.local import run_demo

    overrides: dict[str, dict[str, object]] = {}
    if args.rounds is not None:
        overrides.setdefault("rounds", {})["rounds"] = args.rounds
    if args.devices is not None:
        overrides.setdefault("demo", {})["devices"] = args.devices
    cfg = load(RunConfig, args.config, overrides)
    # a data set that is not installed raises DataMissingError, which says what installs it
    result = run_demo(cfg, run_dir=args.run_dir, progress=True)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options; each subcommand's ``help`` is its line in ``--help``."""
    p = argparse.ArgumentParser(
        prog="edgefl",
        description="Federated learning for fleets of small edge devices over MQTT.",
        epilog="`edgefl COMMAND --help` shows a command's options. Exit codes: 0 done; 1 failed "
        "at run time (the broker unreachable, a round that failed: systemd restarts the "
        "service); 2 a usage or configuration error (systemd does not restart it); 130 "
        "stopped by a signal.",
    )
    p.add_argument("--version", action="version", version=f"edgefl {_version()}")
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="how much to log (default INFO; DEBUG shows every message)",
    )
    p.add_argument("--log-file", help="write logs here instead of standard error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    a = sub.add_parser("aggregator", help="run the aggregator service")
    a.add_argument("--config", required=True, help="aggregator TOML (see configs/)")
    a.add_argument("--rounds", type=int, help="override the number of rounds")
    a.add_argument("--threads", type=int, default=1, help="torch threads for evaluation")
    a.add_argument("--no-export", action="store_true", help="skip the ONNX export at the end")
    a.add_argument("--no-deploy", action="store_true", help="export ONNX but do not publish it")
    a.set_defaults(func=cmd_aggregator)

    d = sub.add_parser("device", help="run device agent(s)")
    d.add_argument(
        "--config",
        required=True,
        action="append",
        help="device TOML; repeat to run several agents in this process",
    )
    d.add_argument("--stats-out", help="write this process's figures here as JSON at exit")
    d.set_defaults(func=cmd_device)

    b = sub.add_parser("broker", help="run Mosquitto with edgefl's configuration")
    b.add_argument("--dir", default="broker-data", help="where config, passwords and data live")
    b.add_argument("--fleet", default="demo", help="the fleet's name, as in the configs' fleet")
    b.add_argument("--port", type=int, default=1883, help="the plain listener's port")
    b.add_argument("--bind", default="0.0.0.0", help="the listeners' address")
    b.add_argument(
        "--plain-bind",
        metavar="ADDR",
        help="the plain listener's own address (e.g. 127.0.0.1 while TLS faces the network)",
    )
    b.add_argument(
        "--no-plain", action="store_true", help="no plain listener at all (needs the TLS files)"
    )
    b.add_argument("--tls-ca", help="CA certificate (edgefl certs): turns the TLS listener on")
    b.add_argument("--tls-cert", help="the broker's certificate")
    b.add_argument("--tls-key", help="the broker's private key")
    b.add_argument("--tls-port", type=int, default=8883, help="the TLS listener's port")
    b.add_argument(
        "--model",
        default="mlp_digits",
        help="the fleet's model ([model] name): sets the packet size limit",
    )
    b.add_argument(
        "--chunk-bytes",
        type=int,
        default=128 * 1024,
        help="the aggregator's deploy.chunk_bytes (ONNX rollout chunks)",
    )
    b.add_argument(
        "--devices",
        type=int,
        default=1000,
        help="how many devices the fleet may grow to: sizes the queue limits",
    )
    b.add_argument(
        "--max-packet-bytes",
        type=int,
        default=0,
        help="cap the packet limit (e.g. 262144, as managed brokers do); larger models and "
        "updates then travel in chunks",
    )
    b.set_defaults(func=cmd_broker)

    e = sub.add_parser("enroll", help="create device accounts and their config files")
    e.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="the ids to enrol")
    e.add_argument(
        "--dir", default="broker-data", help="the broker's directory (edgefl broker --dir)"
    )
    e.add_argument("--fleet", default="demo", help="the fleet's name (edgefl broker --fleet)")
    e.add_argument("--host", required=True, help="the broker's address as the devices see it")
    e.add_argument(
        "--port", type=int, help="the broker's port (default 1883, or 8883 with --tls-ca)"
    )
    e.add_argument("--tls-ca", help="CA certificate path on the device (turns TLS on; port 8883)")
    e.add_argument(
        "--data",
        default="/var/lib/edgefl/data.npz",
        help="local data path on the device; {id} becomes the device id (default %(default)s)",
    )
    e.add_argument(
        "--state-dir",
        default="/var/lib/edgefl/device",
        help="the agent's state directory; {id} becomes the device id (default %(default)s)",
    )
    e.add_argument("--out", default="enrolled", help="where to write the device config files")
    e.add_argument(
        "--registry",
        help="the aggregator's enrolled_devices list to add the ids to "
        "(default: enrolled-devices.txt in --dir)",
    )
    e.set_defaults(func=cmd_enroll)

    c = sub.add_parser("certs", help="make a CA and a TLS certificate for the broker")
    c.add_argument("--dir", default="broker-tls", help="where to write the CA and certificate")
    c.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address devices use to reach the broker (repeatable)",
    )
    c.set_defaults(func=cmd_certs)

    pr = sub.add_parser(
        "predict", help="classify samples with the model the device serves (ONNX Runtime)"
    )
    pr.add_argument("input", help=".npz (X, optional y), .npy, or .csv / text, one sample a line")
    pr.add_argument(
        "--model-dir",
        default="/var/lib/edgefl/device/models",
        help="the device's model directory (state_dir/models)",
    )
    pr.add_argument("--model", help="an .onnx file instead of the deployed model")
    pr.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    pr.set_defaults(func=cmd_predict)

    rb = sub.add_parser("rollback", help="serve the previous model again, fleet-wide")
    rb.add_argument("--config", required=True, help="the aggregator's TOML")
    rb.add_argument("--to", type=int, help="this model version instead of the previous one")
    rb.add_argument("--variant", choices=["fp32", "int8"], help="which of its files to serve")
    _admin_secret_argument(rb)
    rb.set_defaults(func=cmd_rollback)

    ra = sub.add_parser(
        "readmit", help="lift a device's quarantine at the broker (none given: list them)"
    )
    ra.add_argument("device_ids", nargs="*", metavar="DEVICE_ID", help="the ids to re-admit")
    ra.add_argument("--config", required=True, help="the aggregator's TOML (broker address)")
    _admin_secret_argument(ra)
    ra.set_defaults(func=cmd_readmit)

    st = sub.add_parser(
        "status", help="the fleet on one screen: devices, round, accuracy (read-only)"
    )
    _monitor_arguments(st)
    st.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    st.add_argument(
        "--watch", type=float, metavar="N", help="redraw every N seconds until Ctrl-C"
    )
    st.add_argument(
        "--wait", type=float, default=1.0, help="seconds to wait for the retained state"
    )
    st.set_defaults(func=cmd_status)
    split_defaults = DataConfig()  # the demo's: one place for them
    sp = sub.add_parser(
        "split",
        help="turn a data set into devices' data.npz files and the aggregator's test.npz",
        description="Split a data set over devices: OUT/<device id>/data.npz for each device "
        "(the file a device's `data` names), OUT/test.npz (the aggregator's eval_data) and "
        "OUT/split.json (who holds what). Each sample goes to exactly one device or the test "
        "set.",
    )
    sp.add_argument(
        "source",
        metavar="SOURCE",
        help="digits, fashion_mnist, watch, or your own file: .npz with X (samples x features) "
        "and integer y, or .csv with a header row, a label column and numeric features",
    )
    fleet = sp.add_mutually_exclusive_group(required=True)
    fleet.add_argument("--devices", type=int, metavar="N", help="N devices: dev-1 ... dev-N")
    fleet.add_argument(
        "--device-ids", metavar="A,B,C", help="these devices (the ids given to edgefl enroll)"
    )
    sp.add_argument(
        "--partition",
        default=split_defaults.partition,
        choices=PARTITIONS,
        help="dirichlet: label skew (default); iid: even; shards: a few labels each; natural: "
        "one device per subject (watch, or a file that records subjects)",
    )
    sp.add_argument(
        "--alpha",
        metavar="A",
        type=float,
        default=split_defaults.alpha,
        help="the Dirichlet concentration (default %(default)s; larger is more even)",
    )
    sp.add_argument(
        "--min-samples",
        metavar="N",
        type=int,
        default=split_defaults.min_samples,
        help="samples every device gets at least (default %(default)s)",
    )
    sp.add_argument(
        "--shards-per-device",
        metavar="N",
        type=int,
        default=split_defaults.shards_per_device,
        help="label shards per device (default %(default)s)",
    )
    sp.add_argument(
        "--seed",
        type=int,
        default=split_defaults.seed,
        help="seeds the partition (the test set stays the same)",
    )
    sp.add_argument(
        "--test-fraction",
        metavar="F",
        type=float,
        help=f"held out for testing (default {split_defaults.test_fraction}; digits and your "
        "files: fashion_mnist and watch have their own test sets)",
    )
    sp.add_argument(
        "--label-column",
        metavar="NAME",
        default="label",
        help="a .csv's label column (default %(default)s)",
    )
    sp.add_argument(
        "--subject-column",
        metavar="NAME",
        help="a .csv's column naming whose each sample is (for natural)",
    )
    sp.add_argument(
        "--out", metavar="DIR", default="data", help="where to write (default: %(default)s)"
    )
    sp.set_defaults(func=cmd_split)

    db = sub.add_parser("dashboard", help="a live, read-only web page of the fleet")
    _monitor_arguments(db)
    db.add_argument("--bind", default="127.0.0.1",
                    help="the page's address (default %(default)s); any but loopback needs a "
                    "token")
    db.add_argument("--http-port", type=int, default=8080,
                    help="the page's port (default %(default)s)")
    tok = db.add_mutually_exclusive_group()
    tok.add_argument("--token", help="require this token on every request (?token= or a "
                     "Bearer header); needed to serve a non-loopback address")
    tok.add_argument("--token-file", help="read the token from this file instead")
    db.set_defaults(func=cmd_dashboard)

    m = sub.add_parser("demo", help="run B1 locally: broker, aggregator, devices, ONNX")
    m.add_argument("--config", default="configs/b1.toml", help="the run's TOML (see configs/)")
    m.add_argument("--rounds", type=int, help="override the number of rounds")
    m.add_argument("--devices", type=int, help="override the number of simulated devices")
    m.add_argument("--run-dir", help="where to put the run's files (default runs/<time>)")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "demo" or args.log_file:
        quiet = args.command == "status"  # its screen (or one-line error) says it all
        _setup_logging(args.log_level or ("CRITICAL" if quiet else "INFO"), args.log_file)
    try:
        return args.func(args)
    except UserError as e:
        # the one place user-facing errors are reported: one line, no traceback (a bug, any
        # other exception, keeps its traceback)
        print(f"edgefl {args.command}: {e.line()}", file=sys.stderr)
        if args.log_file:  # and where the rest of the story is
            log.error("%s", e.line())
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGNAL


if __name__ == "__main__":
    sys.exit(main())
