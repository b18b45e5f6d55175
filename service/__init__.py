"""Service: FastAPI search over ONNX + FAISS with Redis history. Must not import torch.

Numerical libraries start their thread pools when first imported; on a small machine ~40 server
threads each with its own BLAS pool cut throughput ~20x (DESIGN §8). Importing this package before
numpy keeps them single-threaded unless the environment says otherwise; ONNX Runtime gets its
intra-op threads explicitly from `serve.intra_op_threads`.
"""

import os

from karma.machine import THREAD_ENV

for _name, _value in THREAD_ENV.items():
    os.environ.setdefault(_name, _value)
