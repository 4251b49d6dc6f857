"""Deployment: ONNX export of the descriptor, checked against PyTorch."""
