"""Training and evaluation of a whole detector: the training loop, optimizer and schedule, checkpoints,
COCO evaluation, torch.distributed plumbing, run loggers and the run directory."""
