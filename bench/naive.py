"""The naive baseline: the PyTorch query tower from the training checkpoint, per request, no batching,
served by the same FastAPI app (`service.app.create_app`) as `karma serve`.

    python -m bench.naive --checkpoint CKPT --bundle DIR --port 8001 [--set serve.KEY=VALUE ...]

Only the encoder differs from the service: `TorchQueryEncoder` stands in for the ONNX Runtime
sessions inside `service.engine.Engine` (injected through `create_app(engine_factory=...)`; the
service package itself never imports torch). Everything else is the service's own code: routes,
validation, featurisation, the FAISS index of the bundle, the encoder thread. The micro-batcher is
pinned to batches of one (`serve.max_batch_size=1`), so every request runs the PyTorch tower alone:
eager mode, `torch.inference_mode()`, 1 torch thread. At start-up the checkpoint must reproduce the
bundle's ONNX query encoder (max |h_torch - h_onnx| <= 1e-4), so both sides serve the same model.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

from karma.errors import KarmaError
from karma.machine import THREAD_ENV

PARITY_TOLERANCE = 1e-4


class TorchQueryEncoder:
    """Stands in for `karma.bundle.EncoderSessions` in `service.engine.Engine`: the eager PyTorch tower."""

    def __init__(self, checkpoint: Path, feature_dim: int):
        import torch

        from export.onnx_export import build_served_towers
        from training.checkpoint import read_checkpoint_info

        self.torch = torch
        config = read_checkpoint_info(checkpoint).config
        self.tower = build_served_towers(checkpoint, config, feature_dim).query.eval()
        self.providers = [f"PyTorch {torch.__version__} eager ({torch.get_num_threads()} thread(s))"]

    def encode_query(self, feeds: dict[str, Any], run_options: Any = None) -> Any:  # run_options: ORT only
        torch = self.torch
        with torch.inference_mode():
            h = self.tower(**{name: torch.from_numpy(value) for name, value in feeds.items()})
        return h.numpy()


def check_parity(
    engine: Any, encoder: Any, reference: Any, what: str, of: str, min_cosine: float | None = None
) -> None:
    """KarmaError unless `encoder` gives `reference`'s h_t on two probe requests built by `engine.feeds`:
    max |diff| <= PARITY_TOLERANCE, or (a quantised graph) min cosine >= `min_cosine`."""
    import numpy as np

    rows = np.arange(min(7, engine.n_items), dtype=np.int64)
    feeds = engine.feeds(["a probe query", ""], [rows, rows[:2]])
    got, want = encoder.encode_query(feeds), reference.encode_query(feeds)
    if min_cosine is None:
        diff = float(np.abs(got - want).max())
        if diff > PARITY_TOLERANCE:
            raise KarmaError(f"{what} is not the model of {of}: max |h - h_onnx| = {diff:.2e} > {PARITY_TOLERANCE:.0e}")
        return
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-12)
    if float(cos.min()) < min_cosine:
        raise KarmaError(f"{what} is not the model of {of}: min cosine of h = {float(cos.min()):.4f} < {min_cosine}")


def naive_engine(directory: Path, checkpoint: Path) -> Any:
    """An `Engine` over the bundle in `directory` whose query encoder is the checkpoint's PyTorch tower."""
    from karma.bundle import load_bundle
    from service.engine import Engine

    bundle = load_bundle(directory)
    engine = Engine(bundle, TorchQueryEncoder(Path(checkpoint), bundle.manifest.dims.feature_dim))
    reference = bundle.open_sessions(intra_op_threads=1, inter_op_threads=1)
    check_parity(engine, engine.sessions, reference, f"checkpoint {checkpoint}", f"bundle {directory}")
    engine.probe()
    engine.warm(1)
    return engine


def main(argv: list[str] | None = None) -> None:
    """`karma serve` with the naive engine: same options (--bundle, --port, --host, --set) plus --checkpoint."""
    os.environ.update(THREAD_ENV)
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="Training checkpoint of the bundle's model.")
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle folder (items, features, FAISS index).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="serve.* override (repeatable).")
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    from karma.config import load_config
    from service.app import create_app
    from service.logs import configure_json_logging

    torch.set_num_threads(1)
    overrides = [*args.sets, f"serve.bundle={args.bundle}", f"serve.host={args.host}", f"serve.port={args.port}"]
    cfg = load_config(overrides=[*overrides, "serve.max_batch_size=1"])  # per request: never batched
    configure_json_logging(cfg.log_level)
    app = create_app(cfg, engine_factory=partial(naive_engine, checkpoint=args.checkpoint))
    drain = max(1, int(cfg.serve.drain_timeout_s))
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, lifespan="on",
                timeout_graceful_shutdown=drain)  # fmt: skip


if __name__ == "__main__":
    main()
