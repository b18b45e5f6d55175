"""Shared by the service benchmarks: build a tiny bundle with the CLI, run `karma serve`, clean Redis.

The code lives in `bench.harness` (also used by `karma bench`); this module keeps the scripts'
imports and shows its progress lines on stderr.
"""

from __future__ import annotations

import logging

from bench.harness import KARMA, REPO, SMALL_DATA, THREAD_ENV, TINY, build_bundle, karma_serve

logging.basicConfig(level=logging.INFO, format="  %(message)s")

__all__ = ["KARMA", "REPO", "SMALL_DATA", "THREAD_ENV", "TINY", "build_bundle", "karma_serve"]
