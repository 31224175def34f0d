"""training: DeepSpeed/megatron training loop, optimizers, data."""
