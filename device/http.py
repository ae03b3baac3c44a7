"""An optional HTTP endpoint on the device for local inference (localhost only by default).

    POST /predict   {"inputs": [[...64 floats...], ...]}
                    ->  {"classes": [...], "version": 7, "variant": "personal"}
    GET  /health    {"version": 7, "variant": "personal", "ready": true, "metadata": {...}}

``variant`` says which model answers: the fleet's file (``fp32`` or ``int8``) or the device's own
personalised model (``personal``, fp32), built on the global model ``version``.

Other programs on the device ask the deployed model for predictions without loading anything
themselves. Requests are size-capped and validated; a bad one gets a 400 with the reason.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from device.inference import InferenceServer

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20


def serve_http(server: InferenceServer, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start the endpoint in a background thread; ``.shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self.path != "/health":
                return self._reply(404, {"error": "use GET /health or POST /predict"})
            self._reply(
                200,
                {
                    "version": server.version,
                    "variant": server.info.get("variant"),
                    "ready": server.ready,
                    "metadata": server.metadata,
                },
            )

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/predict":
                return self._reply(404, {"error": "use POST /predict"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY:
                return self._reply(400, {"error": f"body must be 1 to {MAX_BODY} bytes of JSON"})
            try:
                inputs = np.asarray(json.loads(self.rfile.read(length))["inputs"], dtype=np.float32)
            except (ValueError, KeyError, TypeError):
                return self._reply(400, {"error": 'expected {"inputs": [[numbers, ...], ...]}'})
            if inputs.ndim != 2 or not np.isfinite(inputs).all():
                return self._reply(400, {"error": "inputs must be a 2-D array of finite numbers"})
            if not server.ready:
                return self._reply(503, {"error": "no model deployed yet"})
            try:
                classes, info = server.predict_with_info(inputs)
            except Exception as e:  # wrong feature count, mostly
                return self._reply(400, {"error": f"the model refused the input: {e}"})
            self._reply(
                200,
                {
                    "classes": classes.tolist(),
                    "version": info.get("version"),
                    "variant": info.get("variant"),
                },
            )

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("http: " + fmt, *args)

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http-predict", daemon=True).start()
    log.info("local inference endpoint on http://%s:%d/predict", host, httpd.server_port)
    return httpd
