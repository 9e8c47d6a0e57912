"""Throughput measurement of our detector and torchvision's FCOS, measured alike (no Hydra here)."""
