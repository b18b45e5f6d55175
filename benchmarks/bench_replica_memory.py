"""A replica's memory with the item features memory-mapped (now) vs read into RAM (before), at N items.

    python benchmarks/bench_replica_memory.py [--bundle artifacts/bundles/default] [--items 100000,1000000]

For each size it writes a scaled copy of the bundle (rows tiled, fresh item ids, a flat FAISS index
rebuilt, the manifest re-signed), then in a fresh process per mode loads the serving engine
(`service.engine.Engine.load`: ONNX sessions, FAISS, embeddings), probes it and serves 500 searches
with 50-item histories, and reads /proc/self/status: RssAnon (memory the process owns) and
RssFile (file pages mapped in: the page cache's, reclaimable, shared with other replicas on the host).
"read" reproduces the old loader by copying the mapped features into RAM. Writes
artifacts/benchmarks/replica_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from karma.bundle import (
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_FEATURES_FILE,
    ITEM_ID_BUCKETS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    import_faiss,
    resign_bundle,
)
from karma.machine import machine, machine_line

PROBE = r"""
import json, sys
import numpy as np
from service.engine import Engine
bundle, mode = sys.argv[1], sys.argv[2]
engine = Engine.load(bundle, ["CPUExecutionProvider"], 1)
if mode == "read":
    engine._features = np.array(engine._features)  # the old loader: the whole matrix in RAM
engine.probe()
rng = np.random.default_rng(0)
for _ in range(50):
    jobs = [engine.make_job("red shoes", rng.integers(0, engine.n_items, 50).tolist(), 10, True) for _ in range(10)]
    engine.run_batch(jobs)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
kib = lambda key: int(status[key].split()[0])
print(json.dumps({"rss_anon_mib": kib("RssAnon") / 1024, "rss_file_mib": kib("RssFile") / 1024,
                  "vm_hwm_mib": kib("VmHWM") / 1024}))
"""


def scaled_copy(bundle: Path, n: int, root: Path, jitter: float = 0.0) -> Path:
    """`bundle` with its rows tiled to `n` items (`jitter`: noise on the tiled embeddings, so they are not ties)."""
    out = root / f"items-{n}"
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    base = manifest["n_items"]
    take = np.arange(n) % base
    items = pd.read_parquet(out / ITEMS_FILE).iloc[take].reset_index(drop=True)
    items["item_id"] = [f"x{i:08d}" for i in range(n)]
    items.to_parquet(out / ITEMS_FILE)
    for name in (ITEM_FEATURES_FILE, ITEM_EMBEDDINGS_FILE, ITEM_ID_BUCKETS_FILE):
        if (out / name).exists():
            np.save(out / name, np.load(out / name)[take])
    if jitter:
        e = np.load(out / ITEM_EMBEDDINGS_FILE)
        e += np.random.default_rng(0).normal(0, jitter, e.shape).astype(np.float32)
        np.save(out / ITEM_EMBEDDINGS_FILE, (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32))
    faiss = import_faiss()
    index = faiss.IndexFlatIP(int(manifest["dims"]["embed_dim"]))
    index.add(np.load(out / ITEM_EMBEDDINGS_FILE))
    faiss.write_index(index, str(out / INDEX_FILE))
    manifest["n_items"] = n
    manifest["index"]["n_items"] = n
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    resign_bundle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundles/default"))
    parser.add_argument("--items", default="100000,1000000")
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/replica_memory.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="karma-memory-") as tmp:
        for n in (int(x) for x in args.items.split(",")):
            copy = scaled_copy(args.bundle, n, Path(tmp))
            features_mib = (copy / ITEM_FEATURES_FILE).stat().st_size / 2**20
            for mode in ("read", "mapped"):
                done = subprocess.run([sys.executable, "-c", PROBE, str(copy), mode], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-2000:])
                rows.append({"items": n, "mode": mode, "features_mib": features_mib, **json.loads(done.stdout)})
            shutil.rmtree(copy)
    m = machine()
    print(f"serving engine after 500 searches; {machine_line(m)}")
    print(f"{'items':>9} {'features':>10} {'mode':>7} {'RssAnon MiB':>12} {'RssFile MiB':>12} {'peak RSS MiB':>13}")
    for r in rows:
        print(
            f"{r['items']:>9,} {r['features_mib']:>8.0f} MiB {r['mode']:>7} {r['rss_anon_mib']:>12.0f} "
            f"{r['rss_file_mib']:>12.0f} {r['vm_hwm_mib']:>13.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "machine": m}, indent=2))


if __name__ == "__main__":
    main()
