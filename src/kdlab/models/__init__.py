"""Models: loading, scoring (logits and hidden states of targets), LoRA, sharding (FSDP2), export, shipped assets."""
