"""KARMA model: backbones, the served towers, the train-only heads, and the training objective."""
