"""The Python API (`service.searcher.Searcher`) ranks exactly as POST /search, on a real tiny bundle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from karma.config import ServeConfig
from karma.errors import KarmaError
from service.app import create_app
from service.searcher import Searcher


def test_searcher_matches_the_http_service_and_exposes_h_t(tiny_export: tuple[Path, Path]) -> None:
    bundle = tiny_export[1]
    searcher = Searcher(bundle)
    items = searcher.engine.item_ids
    cases = [
        {"query": "red running shoes", "history": items[3:9], "k": 7},
        {"query": "", "history": items[40:60], "k": 5, "exclude_history": True},
        {"query": "gift mug", "history": [], "k": 4},
    ]
    app = create_app(ServeConfig(bundle=bundle, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2))

    async def over_http() -> list[dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://karma") as client:
                return [(await client.post("/search", json=case)).json() for case in cases]

    answers = asyncio.run(over_http())
    for case, answer in zip(cases, answers, strict=True):
        hits = searcher.search(**case)
        assert [h.item_id for h in hits] == [i["item_id"] for i in answer["items"]]
        np.testing.assert_allclose([h.score for h in hits], [i["score"] for i in answer["items"]], rtol=1e-5)
        h = searcher.embed(case["query"], case["history"])
        assert h.shape == (searcher.engine.manifest.dims.embed_dim,) and abs(float(np.linalg.norm(h)) - 1) < 1e-3
        scores = searcher.item_vectors([x.item_id for x in hits]) @ h
        np.testing.assert_allclose(scores, [x.score for x in hits], rtol=1e-4, atol=1e-5)
    assert answers[0]["model_version"] == searcher.model_version
    skipped = searcher.search(query="red running shoes", history=[*items[3:9], "not-an-item"], k=7)
    assert [h.item_id for h in skipped] == [i["item_id"] for i in answers[0]["items"]]  # unknown ids skipped
    excluded = set(items[40:60])
    assert not excluded & {h.item_id for h in searcher.search(history=items[40:60], k=5, exclude_history=True)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": "", "history": []}, "nothing to search with"),
        ({"query": "x", "history": ["not-an-item"], "strict": True}, "not in this bundle's catalog"),
        ({"query": "", "history": ["not-an-item"]}, "not in this bundle's catalog"),
        ({"query": "x", "k": 0}, "k must be between 1"),
    ],
)
def test_searcher_refuses_bad_input_with_one_clear_error(
    tiny_export: tuple[Path, Path], kwargs: dict, message: str
) -> None:
    with pytest.raises(KarmaError, match=message):
        Searcher(tiny_export[1]).search(**kwargs)
