"""Training: one loop for every stage (loop), optimizers and schedules (optim), MFU (mfu), and the `train` /
`checkpoints` commands. Checkpoints and the torch.distributed glue are foundations in nanoforge/checkpoint.py
and nanoforge/dist.py, so later stages load models without importing training code."""
