"""Publishing the global model to the fleet (retained on model/global, QoS 1).

The broker keeps the latest model as a retained message, so a device that connects at any time
gets the current one at once, and a device that reconnects after a round or two catches up.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgefl.compression import make_codec
from edgefl.messages import GlobalModel, encode_model
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics


class ModelBroadcast:
    def __init__(self, link: MqttLink, topics: Topics, model_name: str) -> None:
        self.link = link
        self.topics = topics
        self.model_name = model_name
        self.codec = make_codec("dense_fp32")
        # what one device downloads to get the current model (for the byte accounting)
        self.bytes_per_device = 0

    def publish(self, weights: Mapping[str, np.ndarray], version: int, round_: int) -> None:
        msg = GlobalModel(version, round_, self.model_name, dict(weights))
        payload = encode_model(msg, self.codec)
        self.bytes_per_device = len(payload)
        self.link.publish(self.topics.model_global, payload, qos=1, retain=True)
