"""CUDA-graph capture and replay of the network part of training and inference steps."""
