"""Training: batches, loss, schedule, the loop, checkpoints and resume."""
