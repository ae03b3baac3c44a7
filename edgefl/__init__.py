"""edgefl: federated learning for fleets of small edge devices over MQTT."""

__version__ = "0.1.0"
