"""The aggregator as a service: rounds, then export and rollout, and an honest exit code.

``edgefl aggregator`` runs :func:`run_service`. The rounds run in a thread of their own so that
a signal can stop them; whatever ends them decides what happens next:

- they all ran: the model is exported to ONNX, rolled out, and the exit code is 0;
- a signal: the last checkpoint stands, nothing is exported, exit code 130;
- an exception (a checkpoint that cannot be written, a failed publish or evaluation ...): it is
  logged with the round it happened in, nothing is exported or rolled out (the model in memory
  may be one that no checkpoint holds), and the exit code is 1, so systemd restarts the service
  (``Restart=on-failure``) and it resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from aggregator.service import Aggregator
from edgefl.config import AggregatorConfig
from edgefl.memory import peak_rss_mb

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SIGNAL = 130


def run_service(
    cfg: AggregatorConfig,
    *,
    rounds: int | None = None,
    export: bool = True,
    deploy: bool = True,
    stop: threading.Event | None = None,
) -> int:
    """Run the aggregator until its rounds are done, ``stop`` is set, or it fails; the exit
    code. Writes ``summary.json`` into the state directory either way."""
    started = time.perf_counter()
    stop = stop or threading.Event()
    agg = Aggregator(cfg)
    summary: dict[str, Any] = {"fleet": cfg.fleet}
    first_round: dict[str, float] = {}
    failure: list[BaseException] = []

    def note_first(_metrics: object) -> None:
        first_round.setdefault("s", time.perf_counter() - started)

    def rounds_loop() -> None:
        try:
            agg.run(rounds)
        except BaseException as e:  # noqa: BLE001 - any of them ends the service as failed
            failure.append(e)
            log.critical(
                "the round loop failed in round %d (model v%d is the last checkpointed); "
                "stopping without exporting anything",
                agg.next_round,
                agg.checkpointed_version,
                exc_info=e,
            )

    agg.on_round = note_first
    code = EXIT_OK
    with agg:
        runner = threading.Thread(target=rounds_loop, name="rounds", daemon=True)
        runner.start()
        while runner.is_alive() and not stop.is_set():
            runner.join(0.2)
        if stop.is_set():
            log.info("stopping (signal); the checkpoint holds round %d", agg.next_round - 1)
            agg.stop()
            runner.join(5)
            code = EXIT_SIGNAL
        elif failure:
            summary["error"] = f"{type(failure[0]).__name__}: {failure[0]}"[:2000]
            code = EXIT_FAILED
        else:
            if export and agg.history:
                summary["onnx"] = exported = agg.export()
                if cfg.deploy.rollout and deploy:
                    summary["deployment"] = agg.deploy(exported)
            agg.finish()
    agg.guard.flush_log()
    summary.update(
        rounds=[vars(m) for m in agg.history],
        rejected=dict(agg.rejected),
        rejected_by_kind=dict(agg.guard.rejected),
        quarantined=agg.guard.snapshot(),
        # per device, for the run report: rounds (buffers) it contributed to, updates refused
        devices={
            r.device_id: {"rounds": r.rounds_completed, "rejected": r.updates_rejected}
            for r in agg.registry.records()
        },
        peak_rss_mb=peak_rss_mb(),
        startup_to_first_round_s=first_round.get("s"),
        exit_code=code,
    )
    out = Path(cfg.state_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=1))
    if code == EXIT_OK:
        last = agg.history[-1] if agg.history else None
        acc = "-" if not last or last.accuracy is None else f"{last.accuracy:.4f}"
        print(f"aggregator: {len(agg.history)} rounds, final accuracy {acc}; summary in {out}")
    return code
