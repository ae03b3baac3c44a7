"""monitor/dashboard.py: what the page is fed (history, rollout), who may read it (the token, the
Host check, read-only), and the page itself in a real headless Chromium following a real run
over the private Mosquitto."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgefl.config import BrokerConfig, ConfigError, ProfileConfig
from edgefl.topics import Topics
from monitor.dashboard import Dashboard, History, check_exposure, rollout
from monitor.fleet import FleetView
from tests.conftest import FLEET, wait_until

TOKEN = "s3cret-token-for-tests-only"
CHROMIUM = os.environ.get("EDGEFL_CHROMIUM", "/usr/bin/chromium")
# Chromium's own connections (updates, sync, safe browsing) are refused here and slow it down
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]
# set to a path (docs/dashboard.png) to keep the browser test's final screenshot there
KEEP_SCREENSHOT = os.environ.get("EDGEFL_DASHBOARD_SCREENSHOT")


def _status(version: int, **kw) -> dict:
    return {"model_version": version, "round": kw.pop("round", version), "accuracy": None,
            "uplink_bytes": 0, "downlink_bytes": 0, "rejected": {}, "devices": {},
            "ts": 1000.0 + version} | kw


def test_history_keeps_one_point_per_version_with_its_newest_figures() -> None:
    h = History()
    h.add(_status(0, round=1))  # the initial model: nothing to chart
    # v1 appears (as round 1 closes) before its evaluation; the accuracy follows
    h.add(_status(1, uplink_bytes=100))
    h.add(_status(1, accuracy=0.5, uplink_bytes=100))
    h.add(_status(1, round=2, accuracy=0.5, uplink_bytes=100))  # round 2 open, v1 still
    h.add(_status(2, accuracy=0.7, uplink_bytes=250, energy_j=3.5))
    assert [(p["version"], p["round"], p["accuracy"]) for p in h.points] == [
        (1, 1, 0.5), (2, 2, 0.7)]
    assert h.points[1]["uplink_bytes"] == 250 and h.points[1]["energy_j"] == 3.5
    assert h.points[0]["energy_j"] is None
    # a lower version is a new run: the old history goes
    h.add(_status(1, accuracy=0.2))
    assert [(p["version"], p["accuracy"]) for p in h.points] == [(1, 0.2)]


def test_history_lists_rejections_as_they_grow_not_the_totals_it_found() -> None:
    h = History()
    h.add(_status(3, rejected={"stale": 4}, devices={"dev-a": {"rejected": 4}}))
    assert list(h.events) == []  # what had happened before the dashboard looked
    h.add(_status(3, round=4, rejected={"stale": 4, "nan": 1},
                  devices={"dev-a": {"rejected": 4}, "dev-b": {"rejected": 1}}))
    h.add(_status(3, round=4, rejected={"stale": 4, "nan": 1},
                  devices={"dev-a": {"rejected": 4}, "dev-b": {"rejected": 1}}))
    got = [(e["kind"], e["name"], e["delta"], e["total"], e["round"]) for e in h.events]
    assert sorted(got) == [("device", "dev-b", 1, 1, 4), ("reason", "nan", 1, 1, 4)]


def _device(state: str, serving=None, seq=None, variant="fp32") -> dict:
    return {"state": state, "serving": serving, "serving_seq": seq, "serving_variant": variant}


def test_rollout_says_whether_the_online_devices_agree_and_who_is_ahead() -> None:
    snap = {"aggregator": {"model_version": 5}, "devices": {
        "a": _device("online", 4, 7), "b": _device("online", 4, 7), "c": _device("online", 5, 8),
        "d": _device("online"), "e": _device("offline", 9, 9)}}
    r = rollout(snap)
    assert r["state"] == "in progress"
    assert r["models"] == {"v4 fp32": 2, "v5 fp32": 1}
    assert r["ahead"] == ["c"] and r["not_serving"] == ["d"] and r["trained"] == 5
    snap["devices"] = {"a": _device("online", 5, 8), "c": _device("online", 5, 8),
                       "e": _device("offline", 4, 7)}
    assert rollout(snap) | {"models": None} == {
        "state": "settled", "models": None, "ahead": [], "not_serving": [], "trained": 5}
    assert rollout({"aggregator": None, "devices": {}})["state"] == "none"


# -- who may read it --------------------------------------------------------------------------


def _offline_view() -> FleetView:
    """A view that is never started: the access rules need no broker."""
    return FleetView(FLEET, BrokerConfig(host="127.0.0.1", port=1))


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            # an event stream never ends: its first bytes are enough
            body = r.read(200) if url.split("?")[0].endswith("/events") else r.read()
            return r.status, body
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_token_is_checked_on_every_request_and_nothing_can_be_changed() -> None:
    with Dashboard(_offline_view(), "127.0.0.1", 0, token=TOKEN) as dash:
        base = dash.url.rstrip("/")
        for path in ("/", "/api/snapshot", "/events", "/nowhere"):
            status, body = _get(base + path)
            assert status == 401, path
            assert b"needs its token" in body and b"--token" in body
            assert _get(f"{base}{path}?token=wrong-{TOKEN}")[0] == 401
            assert _get(base + path, {"Authorization": "Bearer nope"})[0] == 401
        status, body = _get(f"{base}/?token={TOKEN}")
        assert status == 200 and b"edgefl dashboard" in body
        status, body = _get(f"{base}/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["fleet"]["fleet"] == FLEET
        status, body = _get(f"{base}/events?token={TOKEN}")
        assert status == 200 and b"event: state\n" in body
        assert _get(f"{base}/nowhere?token={TOKEN}")[0] == 404
        # read-only, token or not
        for method in ("POST", "PUT", "DELETE"):
            assert _get(f"{base}/api/snapshot?token={TOKEN}", method=method)[0] == 405


def test_the_page_allows_only_its_own_script_and_refuses_strange_hosts() -> None:
    with Dashboard(_offline_view(), "::1", 0) as dash:  # IPv6 loopback too
        assert dash.url.startswith("http://[::1]:")
        req = urllib.request.Request(dash.url)
        with urllib.request.urlopen(req, timeout=5) as r:
            csp = r.headers["Content-Security-Policy"]
            page = r.read().decode()
        assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        assert "connect-src 'self'" in csp and "/*SCRIPT*/" not in page
        assert "EventSource" in page  # the script is inlined: no other request needed
        # a page elsewhere that points a name of its own at 127.0.0.1 is refused
        assert _get(dash.url, {"Host": f"rebound.example:{dash.port}"})[0] == 403


def test_serving_beyond_loopback_needs_a_long_enough_token() -> None:
    for host in ("0.0.0.0", "192.0.2.10", "::", "dashboard.example"):
        with pytest.raises(ConfigError, match="--token-file"):
            check_exposure(host, None)
        check_exposure(host, TOKEN)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_exposure(host, None)
    with pytest.raises(ConfigError, match="at least 16"):
        check_exposure("0.0.0.0", "short")
    with pytest.raises(ConfigError, match="open to the network"):
        Dashboard(_offline_view(), "0.0.0.0", 0)


# -- the page in a real browser, during a real run --------------------------------------------


@pytest.mark.broker
@pytest.mark.slow
def test_the_page_follows_a_live_run_in_headless_chromium(make_fleet, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: sh monitor/install-chromium.sh installs it")
    from playwright.sync_api import sync_playwright

    fleet = make_fleet(devices=3)
    view = FleetView(FLEET, fleet.broker.broker_config(fleet.broker.monitor)).start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    started = time.monotonic()
    with Dashboard(view, "127.0.0.1", 0) as dash, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(dash.url)
            page.wait_for_selector("#link.live", timeout=10_000)
            assert page.locator("[data-device]").count() == 0

            # the devices come online while the page is open: their tiles appear live
            for i, (battery, charging) in enumerate([(82.0, False), (31.0, True), (64.0, False)]):
                fleet.start_agent(i, profile=ProfileConfig(
                    simulated=True, battery_pct=battery, charging=charging,
                    link_kbps=20_000.0 / (i + 1)))
            for i in range(3):
                page.wait_for_selector(f'[data-device="dev-{i}"][data-state="online"]',
                                       timeout=10_000)
            page.screenshot(path=str(shots / "1-devices-online.png"), full_page=True)

            cfg = fleet.aggregator_config(rounds=8, quorum=0.5, deadline_s=20.0)
            errors: list[BaseException] = []

            def train() -> None:
                try:
                    with fleet.aggregator(cfg) as agg:
                        agg.run()
                        agg.deploy(agg.export())
                        agg.finish()
                except BaseException as e:  # noqa: BLE001 (reported by the test)
                    errors.append(e)

            trainer = threading.Thread(target=train, daemon=True)
            trainer.start()
            # the round counter advances on the page as the aggregator's status does (polled
            # from here: the page's Content-Security-Policy forbids evaluating test scripts)
            def shown_round() -> int:
                shown = page.inner_text("#round")
                return int(shown) if shown.isdigit() else 0

            wait_until(lambda: shown_round() >= 1, 20, "a round on the page")
            first = shown_round()
            wait_until(lambda: shown_round() >= first + 2, 20, "the round counter to advance")

            # dev-0 sends something that is no update: the aggregator rejects it, and the page
            # lists the rejection once the aggregator's status counts it
            fleet.agents["dev-0"].link.publish(Topics(FLEET).update("dev-0"), b"\x00 junk", qos=1)
            page.wait_for_selector("#rejections ul.events li", timeout=15_000)
            assert "from dev-0 +1" in page.inner_text("#rejections")

            # dev-2 dies as if its power went: its Will turns it, and its tile, offline
            fleet.agents["dev-2"].crash()
            page.wait_for_selector('[data-device="dev-2"][data-state="offline"]', timeout=10_000)
            assert page.locator('[data-device="dev-2"] .badge').inner_text() == "offline"
            assert page.locator('[data-state="online"]').count() == 2
            page.screenshot(path=str(shots / "2-device-offline.png"), full_page=True)

            trainer.join(timeout=60)
            assert not trainer.is_alive() and not errors, errors
            page.wait_for_selector("#aggregator-state.finished", timeout=10_000)
            wait_until(lambda: shown_round() == 8, what="round 8 on the page")
            # the survivors serve the model rolled out at the end
            for i in range(2):
                wait_until(lambda i=i: "serves model v8" in page.inner_text(
                    f'[data-device="dev-{i}"]').replace("\n", " "), 15, "the model served")
            # the charts hold the history the dashboard saw: a point per model version
            assert page.locator("#chart-accuracy circle").count() == 8
            assert "%" in page.inner_text('[data-device="dev-1"]')  # its battery
            assert page.locator("#chart-bytes polyline").count() == 2
            final = shots / "3-finished.png"
            page.screenshot(path=str(final), full_page=True)
        finally:
            browser.close()
            view.stop()
    took = time.monotonic() - started
    assert took < 90, f"the browser test took {took:.0f} s"
    assert final.stat().st_size > 10_000  # a drawn page, not a blank one
    if KEEP_SCREENSHOT:
        shutil.copyfile(final, KEEP_SCREENSHOT)


def test_the_page_files_are_package_data() -> None:
    """An installed edgefl serves the page from its package (importlib.resources)."""
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["monitor"]
    monitor = root / "monitor"
    files = [p.relative_to(monitor).as_posix() for p in monitor.glob("static/*")]
    assert sorted(files) == ["static/dashboard.css", "static/dashboard.html",
                             "static/dashboard.js"]
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), name
