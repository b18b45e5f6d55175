"""Frozen content features: text/image encoders, hashed item ids, an on-disk cache and the builder.

Importing this package does not import torch; the encoders load torch (and their weights) only
when they first encode something.
"""

from karma.hashed_id import hashed_id_bucket, hashed_id_buckets
from training.features.build import ItemFeatures, build_item_features
from training.features.cache import FeatureCache, cached_encode, content_key
from training.features.text import (
    HashingTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    make_text_encoder,
    minilm_model_dir,
)
from training.features.visual import EfficientNetLite0Encoder, load_efficientnet_lite0, preprocess_image

__all__ = [
    "EfficientNetLite0Encoder",
    "FeatureCache",
    "HashingTextEncoder",
    "ItemFeatures",
    "MiniLMTextEncoder",
    "TextEncoder",
    "build_item_features",
    "cached_encode",
    "content_key",
    "hashed_id_bucket",
    "hashed_id_buckets",
    "load_efficientnet_lite0",
    "make_text_encoder",
    "minilm_model_dir",
    "preprocess_image",
]
