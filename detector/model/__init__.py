"""The reference FCOS detector: backbones, search-space ops, the reference deformable convolution,
FPNs, heads, points, targets, losses, post-processing, recipes, the builder (the one place that reads
configs to build a model), the torchvision converter. Nothing here imports ``detector.fast``,
``detector.engine``, ``detector.bench`` or ``detector.commands``."""
