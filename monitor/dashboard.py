"""``edgefl dashboard``: a live, read-only web page of one fleet.

A :class:`~monitor.fleet.FleetView` feeds :class:`LiveState`, which folds every change into one
JSON document: the view's snapshot, plus what the aggregator's retained status cannot say on its
own because it holds only the latest figures: the history of accuracy, bytes and energy over
model versions, and the recent rejections (both as this dashboard saw them happen), and the
rollout as the devices report it. :class:`Dashboard` serves it over HTTP (standard library only):

    GET /               the page (monitor/static/, its script and style inlined: one request)
    GET /api/snapshot   the document, as JSON
    GET /events         server-sent events: the document again at every change (at most
                        ``MIN_INTERVAL_S`` apart), and a comment line as keep-alive

Nothing else, and no method but GET and HEAD: nothing here changes the fleet. It binds to
127.0.0.1 by default; any other address needs a token, checked on every request (the header
``Authorization: Bearer TOKEN``, or ``?token=TOKEN``, which is how the page passes it on to its
event stream, since a browser's EventSource cannot set headers).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import Counter, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgefl.config import ConfigError
from monitor.fleet import FleetView

log = logging.getLogger(__name__)

# the document is rebuilt at most this often, however busy the fleet: a burst of telemetry is
# one update of the page, not a hundred
MIN_INTERVAL_S = 0.25
# and takes in the fleet at most this often (each look copies every device's state): often
# enough to see every round's closing status, which the aggregator publishes once per round
SAMPLE_INTERVAL_S = 0.05
# an idle event stream sends a comment this often, so a client that went away is noticed
KEEPALIVE_S = 15.0
# what the dashboard remembers (model versions charted, rejection events listed)
MAX_HISTORY = 2000
MAX_EVENTS = 50
# event streams open at once: each holds a server thread
MAX_STREAMS = 32
# a token shorter than this is too easy to guess for a page that faces a network
MIN_TOKEN_CHARS = 16


# -- what the page shows ----------------------------------------------------------------------


class History:
    """The aggregator's figures version by version, and its rejections as they grew, folded
    from its successive statuses (each holds only the latest figures and running totals).

    A point per model version: the figures of the newest status that named that version (the
    accuracy that comes with a version is published after its evaluation, a moment after the
    version itself). A version lower than the last seen means a new run: the history restarts.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=MAX_HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._rejected: dict[str, int] | None = None
        self._by_device: dict[str, int] = {}

    def add(self, status: dict[str, Any] | None) -> None:
        if not status:
            return
        version = status.get("model_version", 0)
        if self.points and version < self.points[-1]["version"]:
            log.info("model version went back to %d: a new run; the history restarts", version)
            self._reset()
        point = {
            "version": version,
            "round": status.get("round", 0),
            "accuracy": status.get("accuracy"),
            "uplink_bytes": status.get("uplink_bytes", 0),
            "downlink_bytes": status.get("downlink_bytes", 0),
            # cumulative energy, where the aggregator's status carries it
            "energy_j": status.get("energy_j"),
            "ts": status.get("ts") or time.time(),
        }
        if version > 0:  # version 0 is the initial model: nothing trained yet
            if self.points and self.points[-1]["version"] == version:
                # the round a version came from is the one open when it first appeared
                point["round"] = self.points[-1]["round"]
                self.points[-1] = point
            else:
                self.points.append(point)
        self._rejections(status)

    def _rejections(self, status: dict[str, Any]) -> None:
        totals = dict(status.get("rejected") or {})
        by_device = {d: f.get("rejected", 0) for d, f in (status.get("devices") or {}).items()}
        if self._rejected is not None:  # the first status gives the totals so far, not news
            now, rnd = status.get("ts") or time.time(), status.get("round", 0)
            grown = [("reason", k, v - self._rejected.get(k, 0), v) for k, v in totals.items()]
            grown += [("device", d, v - self._by_device.get(d, 0), v)
                      for d, v in by_device.items()]
            for kind, name, delta, total in grown:
                if delta > 0:
                    self.events.appendleft({"ts": now, "round": rnd, "kind": kind,
                                            "name": name, "delta": delta, "total": total})
        self._rejected, self._by_device = totals, by_device


def rollout(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Which models the online devices serve, and whether they agree: a deployment (rollout,
    canary or rollback) is in progress while they serve different ones. ``ahead``: the devices
    on a newer deployment than most of the fleet (a canary's, or the first to take a rollout).
    """
    online = {d: v for d, v in snapshot["devices"].items() if v["state"] == "online"}
    serving = {d: v for d, v in online.items() if v.get("serving") is not None}
    models = Counter(f"v{v['serving']} {v.get('serving_variant') or ''}".strip()
                     for v in serving.values())
    seqs = Counter(v.get("serving_seq") for v in serving.values())
    common = seqs.most_common(1)[0][0] if seqs else None
    ahead = sorted(d for d, v in serving.items()
                   if common is not None and (v.get("serving_seq") or 0) > (common or 0))
    if not serving:
        state = "none"
    elif len(seqs) == 1 and len(serving) == len(online):
        state = "settled"
    else:
        state = "in progress"
    aggregator = snapshot.get("aggregator") or {}
    return {
        "state": state,
        "models": dict(models.most_common()),
        "not_serving": sorted(set(online) - set(serving)),
        "ahead": ahead,
        "trained": aggregator.get("model_version"),
    }


class LiveState:
    """The dashboard's document, rebuilt on a thread of its own whenever the view changes
    (never on the MQTT network thread), and a generation to wait on."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.history = History()
        self._cond = threading.Condition()
        self._generation = 0
        self._body = b"{}"
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dashboard-state", daemon=True)

    def start(self) -> None:
        self._rebuild()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._closed

    def current(self) -> tuple[int, bytes]:
        with self._cond:
            return self._generation, self._body

    def wait(self, after: int, timeout: float) -> tuple[int, bytes]:
        """The document once it is newer than generation ``after`` (or as it is after
        ``timeout``, or when the dashboard closes)."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation > after or self._closed, timeout)
            return self._generation, self._body

    def _run(self) -> None:
        seen = self.view.generation
        snapshot: dict[str, Any] | None = None
        published = 0.0
        while not self._closed:
            # the page gets at most one document per MIN_INTERVAL_S, but the history takes
            # in the fleet more often, so that a quick round's figures are not skipped
            due = published + MIN_INTERVAL_S - time.monotonic()
            now = self.view.wait_change(seen, 1.0 if snapshot is None else min(max(due, 0), 1.0))
            try:
                if now != seen:
                    seen = now
                    snapshot = self.view.snapshot()
                    self.history.add(snapshot.get("aggregator"))
                if snapshot is not None and time.monotonic() - published >= MIN_INTERVAL_S:
                    self._publish(snapshot)
                    snapshot, published = None, time.monotonic()
            except Exception:  # a document that cannot be built must not end the live view
                log.exception("the dashboard could not take in the fleet's latest state")
                snapshot = None
            time.sleep(SAMPLE_INTERVAL_S)

    def _rebuild(self) -> None:
        snapshot = self.view.snapshot()
        self.history.add(snapshot.get("aggregator"))
        self._publish(snapshot)

    def _publish(self, snapshot: dict[str, Any]) -> None:
        document = {
            "fleet": snapshot,
            "history": list(self.history.points),
            "rejections": list(self.history.events),
            "rollout": rollout(snapshot),
        }
        body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
        with self._cond:
            self._generation += 1
            self._body = body
            self._cond.notify_all()


# -- who may look -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token (ConfigError says how)."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the dashboard token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe())' makes one)"
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"the dashboard on {host} would be open to the network: give it a token "
            "(--token-file FILE, or --token TOKEN), or serve 127.0.0.1 (the default) and reach it "
            "through an SSH tunnel"
        )


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _page() -> tuple[bytes, str]:
    """The page with its script and style inlined, and a Content-Security-Policy that allows
    exactly those two and connections back to this server: nothing else runs or loads."""
    static = resources.files("monitor") / "static"
    html = (static / "dashboard.html").read_text(encoding="utf-8")
    css = (static / "dashboard.css").read_text(encoding="utf-8")
    js = (static / "dashboard.js").read_text(encoding="utf-8")
    page = html.replace("/*STYLE*/", css).replace("/*SCRIPT*/", js)
    csp = (
        f"default-src 'none'; script-src {_csp_hash(js)}; style-src {_csp_hash(css)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page.encode(), csp


# -- the server -------------------------------------------------------------------------------


class Dashboard:
    """Serve ``view`` on ``host``:``port`` (0: any free port; see :attr:`url`). A token is
    needed on every request when given, and must be given for a non-loopback ``host``
    (ConfigError otherwise). Use as a context manager, or ``start()`` / ``stop()``; the view's
    own lifecycle stays the caller's."""

    def __init__(
        self, view: FleetView, host: str = "127.0.0.1", port: int = 8080,
        token: str | None = None,
    ) -> None:
        check_exposure(host, token)
        self.token = token
        self.state = LiveState(view)
        self.page, self.csp = _page()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.httpd = _Server((host, port), _Handler)
        self.httpd.dashboard = self  # type: ignore[attr-defined]
        self.host = host
        self.port = self.httpd.server_address[1]
        self._serving = threading.Thread(
            target=self.httpd.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self.state.start()
        self._serving.start()
        log.info("dashboard of fleet %s on %s", self.state.view.fleet, self.url)
        return self

    def stop(self) -> None:
        self.state.stop()  # ends the event streams
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def allowed_hosts(self) -> set[str]:
        """Host headers accepted without a token: this server's loopback names, so that a web
        page elsewhere cannot reach it by pointing a name of its own at 127.0.0.1 (DNS
        rebinding)."""
        return {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", self.host)}

    def token_ok(self, header: str | None, query: str | None) -> bool:
        if self.token is None:
            return True
        offered = query
        if header and header.startswith("Bearer "):
            offered = header[len("Bearer "):].strip()
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an open event stream must not hold the process at exit

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:  # an IPv6 address ("::1", "::")
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefl-dashboard"
    protocol_version = "HTTP/1.1"
    # a client that connects and then says nothing gives its thread back after this long
    timeout = 30.0

    @property
    def dash(self) -> Dashboard:
        return self.server.dashboard  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _refuse_method(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, b"this dashboard is read-only\n",
                    "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query).get("token", [None])[0]
        dash = self.dash
        if dash.token is None and self.headers.get("Host", "") not in dash.allowed_hosts():
            self._reply(HTTPStatus.FORBIDDEN, b"unknown Host header\n", "text/plain", head=head)
            return
        if not dash.token_ok(self.headers.get("Authorization"), query):
            self._reply(
                HTTPStatus.UNAUTHORIZED,
                b"this dashboard needs its token: open /?token=TOKEN, or send the header "
                b"'Authorization: Bearer TOKEN' (the token is the one edgefl dashboard was "
                b"started with: --token or --token-file)\n",
                "text/plain; charset=utf-8",
                head=head,
                extra={"WWW-Authenticate": 'Bearer realm="edgefl dashboard"'},
            )
            return
        if url.path == "/":
            self._reply(HTTPStatus.OK, dash.page, "text/html; charset=utf-8", head=head,
                        extra={"Content-Security-Policy": dash.csp})
        elif url.path == "/api/snapshot":
            self._reply(HTTPStatus.OK, dash.state.current()[1], "application/json", head=head)
        elif url.path == "/events":
            self._events(head)
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head=head)

    def _reply(
        self, status: HTTPStatus, body: bytes, ctype: str, head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self._common_headers(ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _common_headers(self, ctype: str) -> None:
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the token may be in the address: never pass it on
        self.send_header("Referrer-Policy", "no-referrer")

    def _events(self, head: bool) -> None:
        dash = self.dash
        if not dash._streams.acquire(blocking=False):
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, b"too many open event streams\n",
                        "text/plain", extra={"Retry-After": "10"})
            return
        try:
            self.send_response(HTTPStatus.OK)
            self._common_headers("text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if head:
                return
            self.wfile.write(b"retry: 2000\n\n")
            seen = -1
            while not dash.state.closed:
                generation, body = dash.state.wait(seen, KEEPALIVE_S)
                if generation > seen:
                    seen = generation
                    self.wfile.write(b"event: state\nid: %d\ndata: %s\n\n" % (generation, body))
                else:
                    self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away
        finally:
            dash._streams.release()
