"""Locust scenario for the KARMA search service (run it only as its own process: locust patches with gevent).

    locust -f loadtest/search.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 2m \\
        --csv loadtest/results/run --html loadtest/results/run.html

Traffic (tagged tasks; `--tags`/`--exclude-tags` select them):
- `events`           POST /events: a click by a user on an item;
- `search`, `user`   POST /search by user_id (history read from Redis), with a query half the time;
- `search`, `history` POST /search with an explicit history and a query (Redis is not read).
User activity and item popularity are Zipf-distributed: a few users and items get most of the traffic.
A search by user_id only names users this process has already posted a click for, so every request
is valid and the target is 0 failures; 422, 429 and 5xx answers all count as failures.

The catalog: with KARMA_LOADTEST_BUNDLE (a bundle folder or its items.parquet; needs pyarrow) the
item ids and titles are read from the bundle; otherwise they are learnt from the service before the
run (GET /info, then POST /search with a few generic queries and k up to 1000). Queries are words of
item titles. Requests only ever go to the configured host, and only to a loopback address unless
the host's name is listed in KARMA_LOADTEST_ALLOWED_HOSTS (comma-separated; compose sets `lb`).

Knobs (environment): KARMA_LOADTEST_USERS (simulated user ids, default 5000), KARMA_LOADTEST_ZIPF
(exponent, default 1.1), KARMA_LOADTEST_K (default 20), KARMA_LOADTEST_WAIT ("min,max" seconds
between one user's requests, default "0.05,0.5"), KARMA_LOADTEST_SEED (default 0).
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import json
import logging
import os
import random
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import gevent
from locust import HttpUser, between, events, tag, task
from locust.exception import StopUser

log = logging.getLogger("karma.loadtest")

N_USERS = int(os.environ.get("KARMA_LOADTEST_USERS", "5000"))
ZIPF = float(os.environ.get("KARMA_LOADTEST_ZIPF", "1.1"))
K = int(os.environ.get("KARMA_LOADTEST_K", "20"))
WAIT = tuple(float(x) for x in os.environ.get("KARMA_LOADTEST_WAIT", "0.05,0.5").split(","))
SEED = int(os.environ.get("KARMA_LOADTEST_SEED", "0"))
ALLOWED_HOSTS = {h.strip() for h in os.environ.get("KARMA_LOADTEST_ALLOWED_HOSTS", "").split(",") if h.strip()}
SEED_QUERIES = ("gift", "black", "blue", "classic", "set", "new", "red", "white", "home", "sport")
FALLBACK_QUERIES = ("gift idea", "red shoes", "wireless headphones", "glass mug", "cotton shirt")
HISTORY_LEN = (1, 20)


class Catalog:
    """Item ids (Zipf popularity over a seeded shuffle) and query words taken from titles."""

    def __init__(self) -> None:
        self.item_ids: list[str] = []
        self.titles: list[str] = []
        self._cum: list[float] = []

    def load(self, ids: list[str], titles: list[str]) -> None:
        order = list(range(len(ids)))
        random.Random(SEED).shuffle(order)
        self.item_ids = [ids[i] for i in order]
        self.titles = [titles[i] for i in order if titles[i]]
        self._cum = list(itertools.accumulate(1.0 / (rank + 1) ** ZIPF for rank in range(len(ids))))

    def item(self, rng: random.Random) -> str:
        return self.item_ids[bisect.bisect_left(self._cum, rng.random() * self._cum[-1])]

    def query(self, rng: random.Random) -> str:
        if not self.titles:
            return rng.choice(FALLBACK_QUERIES)
        words = rng.choice(self.titles).split()
        start = rng.randrange(len(words))
        return " ".join(words[start : start + rng.randint(1, 3)])


CATALOG = Catalog()
_USER_CUM = list(itertools.accumulate(1.0 / (rank + 1) ** ZIPF for rank in range(N_USERS)))


def zipf_user(rng: random.Random) -> str:
    return f"lt-u{bisect.bisect_left(_USER_CUM, rng.random() * _USER_CUM[-1])}"


def host_allowed(host: str | None) -> bool:
    """Loopback (127.0.0.0/8, ::1, localhost) or a name listed in KARMA_LOADTEST_ALLOWED_HOSTS."""
    name = urlsplit(host or "").hostname or ""
    if name in ALLOWED_HOSTS or name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _call(host: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        host.rstrip("/") + path,
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def catalog_from_bundle(path: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path / "items.parquet" if path.is_dir() else path)
    ids = [str(x) for x in table.column("item_id").to_pylist()]
    titles = table.column("title").to_pylist() if "title" in table.column_names else [""] * len(ids)
    return ids, [t or "" for t in titles]


def catalog_from_service(host: str) -> tuple[list[str], list[str]]:
    """Learn item ids and titles through the API itself (not counted in the statistics)."""
    info = _call(host, "/info")
    max_k = int(info.get("limits", {}).get("k", [1, 1000])[1])  # the service says its limit
    k = max(1, min(max_k, int(info.get("n_items") or max_k)))
    found: dict[str, str] = {}
    for query in SEED_QUERIES:
        result = _call(host, "/search", {"query": query, "k": k})
        for item in result["items"]:
            found.setdefault(item["item_id"], item.get("title") or "")
    return list(found), list(found.values())


def _abort(environment, reason: str) -> None:
    log.error("loadtest: %s; stopping", reason)
    environment.process_exit_code = 2
    if environment.runner is not None:
        gevent.spawn(environment.runner.quit)


@events.test_start.add_listener
def _load_catalog(environment, **_kwargs) -> None:
    host = environment.host or ""
    if not host_allowed(host):
        _abort(environment, f"refusing host {host!r}: only loopback, or names in KARMA_LOADTEST_ALLOWED_HOSTS")
        return
    if CATALOG.item_ids:
        return
    bundle = os.environ.get("KARMA_LOADTEST_BUNDLE")
    ids, titles = catalog_from_bundle(Path(bundle)) if bundle else catalog_from_service(host)
    if not ids:
        _abort(environment, "the catalog is empty")
        return
    CATALOG.load(ids, titles)
    log.info("loadtest catalog: %d items (%s)", len(ids), "bundle" if bundle else "learnt from the service")


class SearchUser(HttpUser):
    """One simulated client; the user ids it acts for are drawn from a Zipf over KARMA_LOADTEST_USERS."""

    host = "http://127.0.0.1:8000"
    wait_time = between(*WAIT)
    _ids = itertools.count()

    def on_start(self) -> None:
        if not host_allowed(self.host) or not CATALOG.item_ids:
            raise StopUser()
        self.rng = random.Random(SEED * 1_000_003 + next(self._ids))
        self.known_users: list[str] = []  # users this client has posted clicks for (their history is non-empty)

    def _post(self, path: str, name: str, body: dict) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif path == "/search" and not response.json().get("items"):
                response.failure("no items")
            else:
                response.success()

    @tag("events")
    @task(3)
    def click(self) -> None:
        user = zipf_user(self.rng)
        self._post("/events", "/events", {"user_id": user, "item_id": CATALOG.item(self.rng)})
        if user not in self.known_users:
            self.known_users.append(user)

    @tag("search", "user")
    @task(4)
    def search_by_user(self) -> None:
        if not self.known_users:
            self.click()
            return
        body: dict = {"user_id": self.rng.choice(self.known_users), "k": K}
        if self.rng.random() < 0.5:
            body["query"] = CATALOG.query(self.rng)
        self._post("/search", "/search [user_id]", body)

    @tag("search", "history")
    @task(4)
    def search_with_history(self) -> None:
        history = [CATALOG.item(self.rng) for _ in range(self.rng.randint(*HISTORY_LEN))]
        body = {"query": CATALOG.query(self.rng), "history": history, "k": K}
        self._post("/search", "/search [history]", body)
