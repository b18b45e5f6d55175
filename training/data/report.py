"""Print data set statistics with the split protocol beside them (the rule for every number here)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from karma.config import KarmaConfig
from training.data.split import Split
from training.data.stats import DatasetStats


def protocol_line(split: Split, config: KarmaConfig) -> str:
    return (
        "split protocol: per user chronological (ties by file order); test = last event, "
        "valid = second last, train = earlier events with "
        f">= {config.data.min_history} history event(s); history truncated to the newest {split.max_history}"
    )


def print_stats(stats: DatasetStats, split: Split, config: KarmaConfig, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"data set: {stats.name}", show_header=True, header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    q = stats.events_per_user_quantiles
    rows = [
        ("users", f"{stats.users:,}"),
        ("events", f"{stats.events:,}"),
        ("items in catalog", f"{stats.catalog_items:,}"),
        ("items with events", f"{stats.items_with_events:,}"),
        ("cold items (held out of training)", f"{stats.cold_items:,}"),
        ("test targets on cold items", f"{stats.cold_test_targets:,}"),
        (
            "events/user min / mean / max",
            f"{stats.events_per_user_min} / {stats.events_per_user_mean:.1f} / {stats.events_per_user_max}",
        ),
        ("events/user p10 / p50 / p90 / p99", f"{q['p10']:.0f} / {q['p50']:.0f} / {q['p90']:.0f} / {q['p99']:.0f}"),
        ("event share of top 1% items", f"{100 * stats.top1pct_items_event_share:.1f}%"),
        (
            "queries / exposed-unclicked",
            f"{'yes' if stats.with_query else 'no'} / {'yes' if stats.with_exposed else 'no'}",
        ),
        ("train examples (targets)", f"{len(split.train_pos):,}"),
        ("valid users / test users", f"{len(split.valid_pos):,} / {len(split.test_pos):,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(protocol_line(split, config))
