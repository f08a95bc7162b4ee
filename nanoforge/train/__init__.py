"""Training: one loop for every stage (loop), optimizers and schedules (optim), checkpoints, torch.distributed glue
(dist), MFU (mfu), and the `train` / `checkpoints` commands."""
