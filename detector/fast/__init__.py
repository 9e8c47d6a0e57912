"""Optional faster equivalents of reference pieces in :mod:`detector.model`, each with an equality test:
the per-model switch (``switch``) and its self-check (``check``), host-sync-free losses and
post-processing, dtype-keeping norms, searched-FPN pieces, the fused ``cat`` aggregation, the Triton
deformable convolution; Triton kernels in ``triton/``, CUDA graphs in ``graphs/``."""
