"""`karma bench` output: bench.json (everything), bench.md (the tables, each naming its protocol), PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from karma.jsonable import to_jsonable

SLO_TARGETS = {"throughput_ratio": 3.0, "floor_ratio": 1.5, "overhead_share": 0.20}


def save_report(report: dict[str, Any], out: Path) -> None:
    """A benchmark script's ending: the machine line (report["machine"]), the JSON written, where it went."""
    from karma.machine import machine_line

    print(machine_line(report["machine"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable(report), indent=2))
    print(f"wrote {out}")


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _errors(s: dict[str, Any]) -> str:
    if not s["error_count"]:
        return "0"
    return ", ".join(
        f"{n} × {'no answer' if code == '0' else 'conn' if code == '-1' else code}" for code, n in s["errors"].items()
    )


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(rule) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def headline(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    band = results["meta"]["config"].get("ratio_band", 0.05)
    zc = results.get("zero_cost")
    if zc:
        for q in ("p50", "p99"):
            pooled, spread = zc["ratio"]["pooled"][q], zc["ratio"]["spread"][q]
            ok = abs(pooled - 1) <= band
            rows.append(
                [
                    f"KARMA / action-only latency, {q}",
                    f"{pooled:.3f} (blocks: median {spread['median']:.3f}, "
                    f"range {spread['min']:.3f}–{spread['max']:.3f})",
                    f"1.00 ± {band:.2f}",
                    _verdict(ok),
                ]
            )
    sv = results.get("serving")
    if sv:
        h, b = sv["headline"], sv["backends"]
        slo = h["slo_p99_ms"]
        if "throughput_ratio_vs_naive_at_equal_p99" in h:
            r = h["throughput_ratio_vs_naive_at_equal_p99"]
            rows.append(
                [
                    f"service / naive throughput at equal p99 (≤ {slo:g} ms)",
                    f"{r:.2f}× ({_f(b['service']['capacity']['rps'], 0)} vs "
                    f"{_f(b['naive']['capacity']['rps'], 0)} req/s)",
                    f"≥ {SLO_TARGETS['throughput_ratio']:g}×",
                    _verdict(None if math.isnan(r) else r >= SLO_TARGETS["throughput_ratio"]),
                ]
            )
            rows.append(
                [
                    "service / naive throughput at saturation",
                    f"{h['saturation_ratio_vs_naive']:.2f}× ({_f(b['service']['saturation']['throughput_rps'], 0)} vs "
                    f"{_f(b['naive']['saturation']['throughput_rps'], 0)} req/s)",
                    "",
                    "",
                ]
            )
        if "batching_gain_at_equal_p99" in h:
            g, gs = h["batching_gain_at_equal_p99"], h["batching_gain_saturation"]
            rows.append(
                [
                    f"micro-batching gain at equal p99 (≤ {slo:g} ms)",
                    f"{g:.2f}× ({_f(b['service']['capacity']['rps'], 0)} vs "
                    f"{_f(b['batching off']['capacity']['rps'], 0)} req/s)",
                    "> 1×",
                    _verdict(None if math.isnan(g) else g > 1.0),
                ]
            )
            rows.append(["micro-batching gain at saturation", f"{gs:.2f}×", "", ""])
        if "service" in b:
            rows.append([f"service capacity at p99 ≤ {slo:g} ms", f"{_f(b['service']['capacity']['rps'], 0)} req/s",
                         "", ""])  # fmt: skip
            common = h.get("batching_at_highest_common_rate")
            if common:
                on, off = common["on_ms"], common["off_ms"]
                rows.append(
                    [
                        f"p50 / p99 at {common['rate']:g} req/s (highest fixed rate both kept up with), on vs off",
                        f"{on['p50']:.1f} / {on['p99']:.1f} ms vs {off['p50']:.1f} / {off['p99']:.1f} ms",
                        "",
                        "",
                    ]
                )
    st = results.get("stages")
    if st:
        share = st["overhead_share_p50"]
        goal = SLO_TARGETS["overhead_share"]
        rows.append([f"share of a request outside encode + search (p50, {st['requests']} sequential)",
                     f"{100 * share:.1f}%", f"≤ {100 * goal:.0f}%", _verdict(share <= goal)])  # fmt: skip
    fl = results.get("floor")
    if fl:
        goal = SLO_TARGETS["floor_ratio"]
        typical = fl.get("service_mean_batch")
        for r in fl["rows"]:
            x = r["ort_over_floor"]["1"]
            at_typical = typical is not None and r["batch"] == max(1, round(typical))
            tag = f" (the service's mean batch at capacity, {typical:.1f})" if at_typical else ""
            rows.append([f"encoder time / FLOP floor, batch {r['batch']}{tag}",
                         f"{x:.2f}× ({r['ort_ms']['1']:.1f} vs {r['floor_ms']['1']:.1f} ms)",
                         f"≤ {goal:g}×" if at_typical or typical is None else "",
                         _verdict(x <= goal) if at_typical or typical is None else ""])  # fmt: skip
    return rows


def _loadgen(s: dict[str, Any]) -> str:
    c = s["loadgen_cpu"]
    return f"{_pct(c['util'])} ({c['us_per_request']:.0f} µs/req)"


def markdown(results: dict[str, Any]) -> str:
    meta, m = results["meta"], results["meta"]["machine"]
    v = m["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "faiss-cpu", "torch", "uvicorn", "uvloop") if k in v)
    lines = [
        f"# karma bench — {meta['date']}",
        "",
        f"- Machine: {m['cpu']} ({m.get('cpu_id', '')}; {', '.join(m.get('isa', [])) or 'no AVX2'}), "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}; "
        f"{versions}.",
        f"  Load average at start {m['load_average_at_start']}, at end {meta.get('load_average_at_end')}.",
        f"- Command: `{meta['command']}` ({meta.get('elapsed_s', 0) / 60:.1f} min).",
    ]
    bundles = results.get("bundles")
    proto = results.get("protocol")
    if bundles and proto:
        built = "built by this run with `karma train --preset P` + `karma export`" if bundles["built_here"] else "given"
        lines.append(
            f"- Bundles ({built}): action-only `{bundles['action_only']}`, karma `{bundles['karma']}`; "
            f"{proto['backbone']} backbone, hidden {proto['hidden']}, D = {proto['embed_dim']}, "
            f"F = {proto['feature_dim']}, {proto['index']} index over {proto['n_items']:,} items."
        )
        if bundles.get("train_overrides"):
            lines.append(f"  Training overrides: `{' '.join(bundles['train_overrides'])}`.")
        lines.append(
            f"- Requests: {proto['request']}; {proto['history_items']} history items "
            f"(max_history {proto['max_history']}), k = {proto['k']}, "
            f"{proto['distinct_bodies']:,} distinct bodies cycled."
        )
        lines.append(
            "- Client: `bench.loadgen`, its own process (asyncio + uvloop, raw keep-alive HTTP/1.1, header and body "
            "in one write); latency = send → last byte of the answer. Every server is its own process (1 ORT / torch / "
            f"BLAS thread), on the same {m['cores']} cores as the client: the load generator's CPU (% of one core, and "
            "per request) and the server's are in each row."
        )
    rows = headline(results)
    if rows:
        lines += ["", "## Headline", "", *_table(["figure", "measured", "target", ""], rows, "lrrl")]
        span = loadgen_span(results)
        if span:
            lines += ["", span]
    if "serving" in results:
        lines += ["", *serving_markdown(results)]
    if "zero_cost" in results:
        lines += ["", *zero_cost_markdown(results)]
    if "stages" in results:
        lines += ["", *stages_markdown(results)]
    if "floor" in results:
        lines += ["", *floor_markdown(results)]
    if "index" in results:
        lines += ["", *index_markdown(results)]
    return "\n".join(lines) + "\n"


def _batching(info: dict[str, Any]) -> str:
    b = info.get("batching") or {}
    return (
        f"max_batch_size {b.get('max_batch_size')}, max_batch_wait_ms {b.get('max_batch_wait_ms'):g}, "
        f"encoder: {(info.get('session_providers') or ['?'])[0]}, intra-op threads {info.get('intra_op_threads')}"
    )


def loadgen_span(results: dict[str, Any]) -> str | None:
    """The load generator's own CPU over every run: range of % of one core and of µs per request."""
    runs = []
    for x in results.get("serving", {}).get("backends", {}).values():
        runs += [x["saturation"], *(r for r in x["rates"] if "skipped" not in r), *x["capacity"]["probes"]]
    if "zero_cost" in results:
        runs.append(results["zero_cost"])
    cpu = [r["loadgen_cpu"] for r in runs]
    if not cpu:
        return None
    util = [c["util"] for c in cpu]
    per = [c["us_per_request"] for c in cpu]
    return (
        f"Load generator's own CPU over all {len(cpu)} runs: {_pct(min(util))}–{_pct(max(util))} of one core "
        f"({min(per):.0f}–{max(per):.0f} µs per request), on the same {results['meta']['machine']['cores']} "
        "cores as the server (each row has both)."
    )


def serving_markdown(results: dict[str, Any]) -> list[str]:
    sv, cfg = results["serving"], results["meta"]["config"]
    b = sv["backends"]
    slo = sv["headline"]["slo_p99_ms"]
    out = [
        "## (a) + (c) `/search`: service vs naive baseline, micro-batching on vs off",
        "",
        *[f"- **{name}**: {x['description']} ({_batching(x['info'])})." for name, x in b.items()],
        f"- Each backend alone (one server at a time, the same request bodies). Saturation: closed loop, "
        f"{cfg['concurrency']} requests in flight. Fixed rates: open loop, Poisson arrivals. Each run "
        f"{cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s measured; throughput = answers completed in the "
        f"measured window / its length. A rate is *sustained* when it has no errors, ≥ 95% of the offered load is "
        f"answered in the window and p99 ≤ {slo:g} ms. Capacity = the highest sustained rate, by bisection "
        f"({cfg['probes']} probes of {cfg['probe_s']:g} s) between the ladder's last pass and first failure.",
        "",
        "### Saturation",
        "",
    ]
    rows = []
    for name, x in b.items():
        s = x["saturation"]
        lat = s["latency_ms"]
        rows.append([name, str(cfg["concurrency"]), _f(s["throughput_rps"], 0), f"{s['requests']:,}", _f(lat["p50"], 2),
                     _f(lat["p95"], 2), _f(lat["p99"], 2), _f(s["mean_batch"], 1), _errors(s),
                     _pct(s["server_cpu_util"]), _loadgen(s)])  # fmt: skip
    out += _table(
        ["backend", "in flight", "req/s", "requests", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors",
         "server CPU", "load generator CPU"], rows, "lrrrrrrrrrr")  # fmt: skip
    out += ["", "### Fixed arrival rates (open loop, Poisson)", ""]
    rows = []
    for i, rate in enumerate(cfg["rates"]):
        for name, x in b.items():
            s = x["rates"][i]
            if "skipped" in s:
                rows.append(
                    [f"{rate:g}", name, "–", "–", "–", "–", "–", "–", "not run: " + s["skipped"], "–", "–", "–"]
                )
                continue
            lat = s["latency_ms"]
            rows.append([f"{rate:g}", name, _f(s["throughput_rps"], 0), f"{s['requests']:,}", _f(lat["p50"], 2),
                         _f(lat["p95"], 2), _f(lat["p99"], 2), _f(s["lag_ms"]["p99"], 2), _errors(s),
                         _f(s["mean_batch"], 1), _pct(s["server_cpu_util"]), _loadgen(s)])  # fmt: skip
    out += _table(
        ["offered req/s", "backend", "answered req/s", "requests", "p50 ms", "p95 ms", "p99 ms", "client lag p99 ms",
         "errors", "mean batch", "server CPU", "load generator CPU"], rows, "rlrrrrrrrrrr")  # fmt: skip
    out += ["", f"### Capacity: highest arrival rate with p99 ≤ {slo:g} ms", ""]
    rows = []
    naive = b.get("naive", {}).get("capacity", {}).get("rps")
    for name, x in b.items():
        c = x["capacity"]
        lo, hi = c["bracket"]
        probes = "; ".join(
            f"{p['rate']:.0f}/s: p99 {_f(p['latency_ms']['p99'], 1)} ms{'' if p['sustained'] else ' ✗'}"
            for p in c["probes"]
        )
        rows.append([name, _f(c["rps"], 0), f"{lo:.0f}–{hi:.0f}{' (top assumed)' if c['upper_assumed'] else ''}",
                     f"{c['rps'] / naive:.2f}×" if naive else "–", probes or "–"])  # fmt: skip
    out += _table(["backend", "capacity req/s", "bracket", "vs naive", "probes (✗ = not sustained)"], rows, "lrrrl")
    return out


def zero_cost_markdown(results: dict[str, Any]) -> list[str]:
    zc, cfg = results["zero_cost"], results["meta"]["config"]
    out = [
        "## (b) Zero added serving cost: `karma` vs `action-only` bundle, same service",
        "",
        f"- {zc['protocol']}; {cfg['warmup_s']:g} s warm-up + {cfg['zero_cost_s']:g} s measured; spread over "
        f"{zc['blocks']} consecutive blocks of the run. Query-encoder graphs identical in structure (nodes, ops, "
        f"initializer shapes): {'yes' if zc['identical_query_graphs'] else '**no**'}. Load generator CPU: "
        f"{_loadgen(zc)}.",
        "",
    ]
    rows = []
    for side, label in (("a", "action-only"), ("b", "karma")):
        s, info = zc[side], zc["info"][side]
        lat = s["latency_ms"]
        params = info.get("parameters") or {}
        rows.append([label, f"`{info['model_version'][:12]}`", f"{params.get('served', 0):,}",
                     f"{info.get('flops_per_request') or 0:,}", f"{s['ok']:,}", _f(lat["p50"], 3), _f(lat["p90"], 3),
                     _f(lat["p99"], 3), _errors(s)])  # fmt: skip
    out += _table(["bundle", "model", "served params", "query FLOPs/request", "requests", "p50 ms", "p90 ms", "p99 ms",
                   "errors"], rows, "llrrrrrrr")  # fmt: skip
    out += [""]
    rows = []
    for q in ("p50", "p99"):
        sp = zc["ratio"]["spread"][q]
        rows.append([q, f"{zc['ratio']['pooled'][q]:.3f}", f"{sp['median']:.3f}", f"{sp['q25']:.3f}–{sp['q75']:.3f}",
                     f"{sp['min']:.3f}–{sp['max']:.3f}"])  # fmt: skip
    out += _table(["karma / action-only", "whole run", "block median", "block IQR", "block range"], rows, "lrrrr")
    return out


def stages_markdown(results: dict[str, Any]) -> list[str]:
    st = results["stages"]
    out = [
        "## Where a request's time goes (low load)",
        "",
        f"- {st['protocol']}: {st['requests']} timed `POST /search` after 50 untimed; stages from each answer's "
        "`timings_ms`; overhead = total − encode − search (HTTP, JSON, validation, featurisation, hand-offs); "
        "client = send → last byte.",
        "",
    ]
    rows = [[name, _f(v["p50"], 3), _f(v["p90"], 3), _f(v["p99"], 3), _f(v["mean"], 3)]
            for name, v in st["stages_ms"].items()]  # fmt: skip
    out += _table(["stage", "p50 ms", "p90 ms", "p99 ms", "mean ms"], rows)
    out += ["", f"Share outside encode + search, median over requests: {100 * st['overhead_share_p50']:.1f}%."]
    return out


def floor_markdown(results: dict[str, Any]) -> list[str]:
    fl = results["floor"]
    threads = [str(t) for t in fl["threads"]]
    shapes = ", ".join(f"{w['k']}×{w['n']} ×{w['count']}" for w in fl["weight_shapes"])
    out = [
        "## The query encoder against the FLOP floor",
        "",
        f"- {fl['method']}. {fl['weight_matmuls']} weight MatMuls in the query graph, "
        f"{len(fl['weight_shapes'])} shapes ({shapes}).",
        "- int8 floor: the same FLOPs at ORT's `MatMulInteger` rate (u8 × s8 → s32, 1 thread): what a dynamically "
        "quantised graph could reach at best.",
        "",
    ]
    rows = []
    for r in fl["rows"]:
        rows.append(
            [str(r["batch"]), str(r["tokens_per_request"]), _f(r["flops_per_batch"] / 1e9, 2)]
            + [_f(r["gemm_gflop_s"][t], 0) for t in threads]
            + [_f(r["floor_ms"][threads[0]], 2)]
            + [f"{_f(r['ort_ms'][t], 2)} ({r['ort_over_floor'][t]:.2f}×)" for t in threads]
            + [_f(r["ort_gflop_s"][threads[0]], 0), f"{_f(r['torch_eager_ms'], 2)} ({r['torch_over_floor']:.2f}×)",
               _f(r["gemm_int8_gop_s"][threads[0]], 0), _f(r["floor_int8_ms"], 2)]
            + ([_f(r["int8_bundle_floor_ms"], 2), f"{_f(r['int8_ort_ms'], 2)} ({r['int8_over_floor']:.2f}×)"]
               if fl.get("int8_bundle") else [])
        )  # fmt: skip
    header = (
        ["batch", "tokens/request", "GFLOP/batch"]
        + [f"GEMM GFLOP/s ({t} thr)" for t in threads]
        + ["floor ms (1 thr)"]
        + [f"ORT ms ({t} thr, × its floor)" for t in threads]
        + ["ORT GFLOP/s (1 thr)", "PyTorch eager ms (×)", "int8 GEMM Gop/s", "int8 floor ms"]
        + (["int8 bundle floor ms", "int8 bundle ORT ms (1 thr, ×)"] if fl.get("int8_bundle") else [])
    )
    out += _table(header, rows)
    if fl.get("service_mean_batch") is not None:
        out += ["", f"The service's mean batch at its capacity rate: {fl['service_mean_batch']:.1f}."]
    if fl.get("int8_bundle"):
        out += [
            "",
            f"int8 bundle: `{fl['int8_bundle']}` (the same checkpoint, `karma export --quantize int8`); "
            f"{100 * fl['int8_bundle_fp32_share']:.0f}% of its weight-GEMM FLOPs stay fp32, so its floor is that "
            "share at the fp32 rate plus the rest at the int8 rate.",
        ]
    return out


def index_markdown(results: dict[str, Any]) -> list[str]:
    ix = results["index"]
    rows_in = ix["rows"]
    if not rows_in:
        return []
    k = rows_in[0]["k"]
    out = [
        f"## (d) Exact vs approximate index: recall@{k} against exact, latency, memory",
        "",
        f"- Synthetic unit vectors of the served width D = {ix['dim']} (a Gaussian mixture around 1,000 random "
        f"centres; queries from the same mixture); indexes built by `export.index.build_index` (what `karma export "
        f"--index` builds), FAISS on 1 thread. Recall@{k} = |top-{k} ∩ exact top-{k}| / {k}, mean over "
        f"{rows_in[0]['recall_queries']} queries; latency = one query per search (batch 1), top-{k}, over "
        f"{rows_in[0]['latency_queries']} queries; size = the serialized index (what the bundle ships and the "
        "service holds in memory).",
        "",
    ]
    rows = []
    for r in rows_in:
        params = ", ".join(f"{k_}={v}" for k_, v in r["params"].items() if k_ != "seed") or "exact"
        lat = r["latency_ms"]
        recall = r[f"recall@{k}"]
        rows.append([f"{r['n']:,}", r["index"], params, _f(r["build_s"], 1), _f(r["bytes"] / 2**20, 1),
                     _f(r["bytes_per_vector"], 0), f"{recall:.4f}", _f(lat["p50"], 3), _f(lat["p99"], 3)])  # fmt: skip
    out += _table(["items", "index", "parameters", "build s", "size MiB", "bytes/item", f"recall@{k}", "p50 ms",
                   "p99 ms"], rows, "rllrrrrrr")  # fmt: skip
    return out


# ---- plots ------------------------------------------------------------------------------------------------------


def _save(fig: Any, title: str, path: Path) -> Path:
    """Title, lay out, write and close one figure; its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    written = []
    title = f"{results['meta']['machine']['cpu']}, {results['meta']['machine']['cores']} cores"
    proto = results.get("protocol")
    if proto:
        title += (f" — {proto['backbone']} backbone, {proto['n_items']:,} items, "
                  f"{proto['history_items']} history items ({proto.get('history_mix', 'fixed')})")  # fmt: skip
    colors = {"service": "tab:blue", "batching off": "tab:orange", "naive": "tab:red"}
    if "serving" in results:
        sv = results["serving"]
        slo = sv["headline"]["slo_p99_ms"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
        for name, x in sv["backends"].items():
            runs = sorted(
                [r for r in [*x["rates"], *x["capacity"]["probes"]] if "skipped" not in r], key=lambda r: r["rate"]
            )
            rates = [r["rate"] for r in runs]
            c = colors.get(name)
            left.plot(rates, [r["latency_ms"]["p99"] for r in runs], "o-", color=c, label=f"{name} p99")
            left.plot(rates, [r["latency_ms"]["p50"] for r in runs], "x--", color=c, alpha=0.6, label=f"{name} p50")
            left.axvline(x["capacity"]["rps"], color=c, linestyle=":", linewidth=1)
            lat = np.sort(np.asarray(sv["latencies_at_saturation_ms"][name]))
            if len(lat):
                right.plot(lat, np.arange(1, len(lat) + 1) / len(lat), color=c,
                           label=f"{name}: {x['saturation']['throughput_rps']:.0f} req/s")  # fmt: skip
        left.axhline(slo, color="gray", linestyle="--", linewidth=1, label=f"SLO p99 {slo:g} ms")
        left.set(xscale="log", yscale="log", xlabel="offered req/s (Poisson)", ylabel="latency ms",
                 title="/search latency vs arrival rate (dotted: capacity)")  # fmt: skip
        left.legend(fontsize=7)
        right.set(xscale="log", xlabel="latency ms", ylabel="fraction of requests",
                  title=f"saturation ({results['meta']['config']['concurrency']} in flight): latency CDF")  # fmt: skip
        right.legend(fontsize=8)
        written.append(_save(fig, title, out / "serving_latency.png"))
    if "zero_cost" in results:
        zc = results["zero_cost"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        blocks = zc["ratio"]["blocks"]
        x = np.arange(1, len(blocks) + 1)
        for q, marker in (("p50", "o"), ("p99", "s")):
            left.plot(x, [b[q] for b in blocks], marker + "-", label=f"{q} ratio")
        band = results["meta"]["config"].get("ratio_band", 0.05)
        left.axhspan(1 - band, 1 + band, color="green", alpha=0.1, label=f"1.00 ± {band}")
        left.axhline(1.0, color="gray", linewidth=1)
        left.set(xlabel="block of the run", ylabel="karma / action-only", title="latency ratio per block")
        left.legend()
        for side, label, c in (("a", "action-only", "tab:gray"), ("b", "karma", "tab:blue")):
            lat = np.sort(np.asarray(zc["latencies_ms"][side]))
            if len(lat):
                right.plot(lat, np.arange(1, len(lat) + 1) / len(lat), color=c, label=label)
        right.set(xscale="log", xlabel="latency ms", ylabel="fraction of requests", title="latency CDF (interleaved)")
        right.legend()
        written.append(_save(fig, title, out / "zero_cost.png"))
    if "floor" in results:
        fl = results["floor"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        batch = [r["batch"] for r in fl["rows"]]
        left.plot(batch, [r["floor_ms"]["1"] for r in fl["rows"]], "k--", label="fp32 floor (1 thread)")
        left.plot(batch, [r["floor_int8_ms"] for r in fl["rows"]], "k:", label="int8 floor (1 thread)")
        for t in fl["threads"]:
            left.plot(batch, [r["ort_ms"][str(t)] for r in fl["rows"]], "o-", label=f"ONNX Runtime, {t} thread(s)")
        left.plot(batch, [r["torch_eager_ms"] for r in fl["rows"]], "s-", label="PyTorch eager, 1 thread")
        if fl.get("int8_bundle"):
            left.plot(batch, [r["int8_ort_ms"] for r in fl["rows"]], "^-", label="ORT int8 bundle, 1 thread")
        left.set(xscale="log", yscale="log", xlabel="batch (requests)", ylabel="ms per batch",
                 title="query encoder time per batch vs FLOP floor")  # fmt: skip
        left.legend(fontsize=8)
        for t in fl["threads"]:
            right.plot(batch, [r["ort_over_floor"][str(t)] for r in fl["rows"]], "o-", label=f"ORT {t} thread(s)")
        if fl.get("int8_bundle"):
            right.plot(batch, [r["int8_over_floor"] for r in fl["rows"]], "^-", label="ORT int8 bundle / its floor")
        right.axhline(SLO_TARGETS["floor_ratio"], color="gray", linestyle="--", label="goal 1.5×")
        right.set(xscale="log", xlabel="batch (requests)", ylabel="measured / floor", title="distance to the floor")
        right.legend(fontsize=8)
        written.append(_save(fig, title, out / "floor.png"))
    if "index" in results and results["index"]["rows"]:
        rows = results["index"]["rows"]
        sizes = sorted({r["n"] for r in rows})
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
        k = rows[0]["k"]
        for ax, n in zip(axes[0], sizes, strict=True):
            for r in (r for r in rows if r["n"] == n):
                ax.scatter(r["latency_ms"]["p50"], r[f"recall@{k}"], s=40)
                tag = ",".join(f"{a}={b}" for a, b in r["params"].items() if a in ("ef_search", "nprobe"))
                ax.annotate(f"{r['index']} {tag}".strip(), (r["latency_ms"]["p50"], r[f"recall@{k}"]), fontsize=8)
            ax.set(xscale="log", xlabel="p50 ms / query (batch 1)", ylabel=f"recall@{k} vs exact", title=f"{n:,} items")
            ax.xaxis.set_minor_formatter(NullFormatter())  # crowded minor labels on a short log range
        written.append(_save(fig, title, out / "index.png"))
    return written


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(to_jsonable(results), indent=1) + "\n")
    paths[1].write_text(markdown(results))
    return paths + plots(results, out)
