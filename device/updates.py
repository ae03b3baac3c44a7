"""From a round's training to the bytes of its update envelope.

The update is the delta from the base model the round started from, encoded with the codec the
task names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgefl.compression import make_codec
from edgefl.messages import GlobalModel, Task, Update, encode_update


class UpdateEncoder:
    def __init__(self, device_id: str, state_dir: str | Path) -> None:
        self.device_id = device_id
        self.state_dir = Path(state_dir)

    def encode(
        self,
        task: Task,
        base: GlobalModel,
        trained: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: dict[str, float],
    ) -> bytes:
        delta = {k: trained[k] - base.weights[k] for k in base.weights}
        update = Update(
            device_id=self.device_id,
            round=task.round,
            base_version=task.base_version,
            num_samples=num_samples,
            delta=delta,
            metrics=metrics,
        )
        return encode_update(update, make_codec(task.codec))
