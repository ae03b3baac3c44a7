"""Operator tools: read-only views of a running fleet (``edgefl status``, dashboards).

A fourth role beside broker/, device/ and aggregator/: it imports edgefl/ only, and it reads
what the fleet publishes for operators (retained device status and telemetry, the aggregator's
retained status) and never a model or an update.
"""
