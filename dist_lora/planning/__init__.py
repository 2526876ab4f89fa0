"""`dist-lora plan`: peak GPU memory per component, estimated from configs alone (no weights loaded)."""
