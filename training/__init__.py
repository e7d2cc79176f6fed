"""The training run: its settings and recipes, the model set-up, one optimizer step and its losses
(pseudo-repetition included), the schedule, checkpoints, several processes, and the run's log."""
