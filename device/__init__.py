"""The device agent: what runs on each Pi-class device (training, updates, ONNX inference)."""
