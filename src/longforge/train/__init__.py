"""Training: batches, the model's preparation for a layout (parallelize), optimizers, schedule, checkpoints and
export, resume checks, and the loop that drives them."""
