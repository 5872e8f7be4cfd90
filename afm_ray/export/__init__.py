"""A logged student as a file a deployment loads.

- formats.py   ONNX / TorchScript / safetensors, verified against the PyTorch model; onnxruntime latency

`python -m afm_ray.export` (__main__.py) exports a student named by an MLflow URI.
"""
