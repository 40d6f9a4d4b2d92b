"""The loop wing: the one training loop, its arithmetics (one network alone, or a pack
stacked) and the optimizers."""
