"""Optional sinks (TensorBoard, W&B): the core imports them only when one is switched on."""
