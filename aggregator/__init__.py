"""The aggregator service: fleet registry, rounds, aggregation, checkpoints, ONNX export."""
