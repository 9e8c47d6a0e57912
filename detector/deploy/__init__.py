"""From a trained detector to deployment: ONNX export (the deformable convolution decomposed into standard
operators or as the opset-19 node), the ONNX Runtime detector, the export parity check, latency measurement."""
