"""Service: FastAPI search over ONNX + FAISS with Redis history (issue: service). Must not import torch."""
