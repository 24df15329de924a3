"""Training: the loop, packs, evaluation and its rows, checkpoints, sessions, CPU tuning."""
