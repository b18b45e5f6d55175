"""26 mistakes a new user makes, run for real: what does each one print?

    python benchmarks/new_user_mistakes.py [--out artifacts/benchmarks/new_user_mistakes.json]

Each mistake is a real `karma …` command (subprocess, from the repository root) or a real HTTP call
to a `karma serve` process on a tiny bundle built for the run. A mistake is handled well when the
user gets one clear line — `error: …` naming what was wrong, with a non-zero exit code for a CLI
command and a typed 4xx JSON body for HTTP — and never a Python traceback. The table shows the
first line each one printed; the JSON keeps the full record. Exit status 1 if any is handled badly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.harness import KARMA, REPO, TINY, build_bundle, karma_serve, log_steps_to_stderr
from karma.machine import THREAD_ENV


@dataclass
class Outcome:
    mistake: str
    command: str
    exit_code: int  # CLI exit code, or HTTP status
    first_line: str
    ok: bool


def _cli(mistake: str, args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> Outcome:
    result = subprocess.run(
        [KARMA, *args],
        cwd=cwd,
        env={**os.environ, **THREAD_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    raw = (result.stderr.strip() or result.stdout.strip()).splitlines()
    text = [line.strip(" │╭╮╰╯─") for line in raw]  # typer's usage errors come in a box
    text = [line for line in text if line and line != "Error"]
    first = next((line for line in text if line.lower().startswith("error:")), "")
    boxed = any("─ Error ─" in line for line in raw)
    if not first and boxed:  # the line after the box's "Error" title: what click refused
        first = next(line for line in text if not line.startswith(("Usage:", "Try ")))
    errors = bool(first)
    shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    ok = result.returncode != 0 and "Traceback" not in result.stdout + result.stderr and errors
    return Outcome(mistake, f"{shown + ' ' if shown else ''}karma {' '.join(args)}", result.returncode, first, ok)


def _http(mistake: str, client: httpx.Client, method: str, path: str, **kwargs: object) -> Outcome:
    response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    try:
        body = response.json()
        first = f"{body.get('type')}: {body.get('error')} (field {body.get('field')})"
        typed = isinstance(body.get("type"), str) and isinstance(body.get("error"), str)
    except ValueError:
        first, typed = response.text[:200], False
    ok = 400 <= response.status_code < 500 and typed and "Traceback" not in response.text
    shown = json.dumps(kwargs.get("json")) if "json" in kwargs else str(kwargs.get("content", ""))[:60]
    return Outcome(mistake, f"{method} {path} {shown}".strip(), response.status_code, first, ok)


def main() -> None:
    log_steps_to_stderr()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/benchmarks/new_user_mistakes.json")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="karma-mistakes-") as tmp:
        work = Path(tmp)
        print("building a tiny bundle (karma train + karma export) ...", file=sys.stderr)
        bundle = build_bundle(work, TINY, run_name="mistakes")
        run = work / "artifacts" / "runs" / "mistakes"
        arts = f"paths.artifacts={work / 'artifacts'}"
        tiny_sets = [a for s in [*TINY, arts] for a in ("--set", s)]
        (work / "broken.yaml").write_text("train: [unclosed\n")
        outcomes = [
            _cli("unknown preset", ["train", "--preset", "karma-xl", *tiny_sets]),
            _cli("misspelt config key", ["train", "--set", "train.stpes=5", *tiny_sets]),
            _cli("out-of-range value", ["train", "--set", "train.steps=-5", *tiny_sets]),
            _cli("config file that does not exist", ["train", "--config", "configs/nope.yaml"]),
            _cli("config file that is not valid YAML", ["train", "--config", str(work / "broken.yaml")]),
            _cli("env override of the wrong type", ["train", *tiny_sets], env={"KARMA_TRAIN__STEPS": "many"}),
            _cli(
                "train into a finished run (would overwrite it)",
                ["train", "--run-name", "mistakes", *tiny_sets],
            ),
            _cli("evaluate a folder that is no run", ["evaluate", str(work / "nothing-here")]),
            _cli("evaluate an unknown split", ["evaluate", str(run), "--split", "holdout"]),
            _cli("export over an existing bundle", ["export", str(run), "--out", str(bundle)]),
            _cli("diagnose a missing run", ["diagnose", str(work / "nothing-here")]),
            _cli("serve a folder that is no bundle", ["serve", "--bundle", str(run)]),
            _cli("serve a bundle path that does not exist", ["serve", "--bundle", str(work / "gone")]),
            _cli("serve on an invalid port", ["serve", "--bundle", str(bundle), "--set", "serve.port=70000"]),
            _cli("unknown baseline", ["baselines", "synthetic", "--which", "itemknn", *tiny_sets]),
            _cli("unknown data set", ["data", "stats", "movielens-20m"]),
            _cli("a data subcommand that does not exist", ["data", "prepare", "ml-1m"]),
            _cli("a MovieLens folder that does not exist", ["data", "stats", f"ml-1m:{work / 'no-ml'}"]),
            _cli("a study file that does not exist", ["study", "studies/nope.yaml"]),
            _cli("an unknown bench option", ["bench", "--items", "lots"]),
        ]
        # a port already in use: hold one, then ask karma serve for it
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        outcomes.append(_cli("serve on a port already in use", ["serve", "--bundle", str(bundle), "--port", str(port)]))
        holder.close()
        print("starting karma serve for the HTTP mistakes ...", file=sys.stderr)
        with karma_serve(bundle, args.redis_url) as (base, _), httpx.Client(base_url=base, timeout=30) as client:
            outcomes += [
                _http("a misspelt field", client, "POST", "/search", json={"query": "shoes", "histroy": ["i1"]}),
                _http("k beyond the limit", client, "POST", "/search", json={"query": "shoes", "k": 5000}),
                _http(
                    "a body that is not JSON",
                    client,
                    "POST",
                    "/search",
                    content=b"query=shoes",
                    headers={"content-type": "application/json"},
                ),
                _http("only unknown history items", client, "POST", "/search", json={"history": ["no-such-item"]}),
                _http("a click on an unknown item", client, "POST", "/events", json={"user_id": "u", "item_id": "x"}),
            ]
    width = max(len(o.mistake) for o in outcomes)
    print(f"\n{'mistake':<{width}}  code  ok  first line printed")
    for o in outcomes:
        print(f"{o.mistake:<{width}}  {o.exit_code:>4}  {'yes' if o.ok else 'NO ':<3} {o.first_line[:150]}")
    good = sum(o.ok for o in outcomes)
    print(f"\n{good} of {len(outcomes)} mistakes get one clear error line (no traceback)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ok": good, "total": len(outcomes), "outcomes": [asdict(o) for o in outcomes]}))
    sys.exit(0 if good == len(outcomes) else 1)


if __name__ == "__main__":
    main()
