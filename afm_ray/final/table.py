"""The final stage's table: per configuration, clean and AutoAttack accuracy as a mean over its seeds
with a 95% interval over seeds and test images (afm_ray.stats.mean_interval), the student's size and
latency, and the published number of the same method and architecture (afm_ray.final.recipes).

An interval needs its students scored on the same images: the mean over K seeds carries Student's t
over the seeds (K >= 2) combined with the Wilson interval of the images; one seed gives the images'
interval alone. Printed as text, written as .csv or .md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from afm_ray.errors import ConfigError
from afm_ray.stats import mean_interval

SUFFIXES = (".csv", ".md")


def summarise(
    rows: Sequence[Mapping[str, Any]], results: Mapping[tuple[str, int], Mapping[str, float]]
) -> pd.DataFrame:
    """One row per configuration. ``rows``: each configuration's description (key, label, method,
    student, teacher, epochs, seeds (asked), published_aa, published_clean, published_source);
    ``results``: the metrics of each finished (key, seed)."""
    out = []
    for row in rows:
        done = [results[(row["key"], s)] for s in row["seeds"] if (row["key"], s) in results]
        record: dict[str, Any] = {k: v for k, v in row.items() if k != "seeds"}
        record["seeds"] = ",".join(str(s) for s in row["seeds"] if (row["key"], s) in results)
        record["students"] = len(done)
        record["images"] = int(done[0]["eval/n_samples"]) if done else 0
        for metric in ("clean_acc", "aa_acc"):
            values = [d[metric] for d in done if metric in d]
            mean, low, high = mean_interval(values, record["images"]) if values else (math.nan,) * 3
            record[metric], record[f"{metric}_ci_low"], record[f"{metric}_ci_high"] = mean, low, high
        record["params"] = done[0].get("params", math.nan) if done else math.nan
        latencies = [d["latency_ms"] for d in done if "latency_ms" in d]
        record["latency_ms"] = statistics.median(latencies) if latencies else math.nan
        published = row.get("published_aa")
        record["aa_minus_published"] = record["aa_acc"] - published if published is not None else math.nan
        out.append(record)
    return pd.DataFrame(out)


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _interval(row: Mapping[str, Any], metric: str) -> str:
    mean, low, high = row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    if isinstance(low, float) and math.isnan(low):
        return f"{_pct(mean)}"
    return f"{_pct(mean)} [{100 * low:.1f}, {100 * high:.1f}]"


def table_lines(frame: pd.DataFrame) -> list[tuple[str, ...]]:
    header = (
        "configuration", "method", "student <- teacher", "epochs", "seeds", "images", "clean % [95%]",
        "AutoAttack % [95%]", "params", "latency ms", "published AA %", "AA - published",
    )  # fmt: skip
    lines = [header]
    for _, r in frame.iterrows():
        params = "-" if math.isnan(r["params"]) else f"{r['params'] / 1e6:.3g}M"
        latency = "-" if math.isnan(r["latency_ms"]) else f"{r['latency_ms']:.3g}"
        published = _pct(r.get("published_aa"))
        if r.get("published_source"):
            published += f" ({r['published_source']})"
        delta = "-" if math.isnan(r["aa_minus_published"]) else f"{100 * r['aa_minus_published']:+.2f}"
        lines.append((
            str(r["label"]), str(r["method"]), f"{r['student']} <- {r['teacher']}", str(r["epochs"]),
            f"{r['students']} ({r['seeds'] or '-'})", str(r["images"]), _interval(r, "clean_acc"),
            _interval(r, "aa_acc"), params, latency, published, delta,
        ))  # fmt: skip
    return lines


LEGEND = (
    "[95%]: the mean over the seeds' students with an interval that adds the seeds' spread (Student's t) "
    "to the test images' binomial noise (Wilson); one seed: the images' interval alone"
)


def format_table(frame: pd.DataFrame) -> str:
    lines = table_lines(frame)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:], LEGEND])


def check_out(path: str) -> None:
    if Path(path).suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--out {path!r}: expected a file name ending in {' or '.join(SUFFIXES)}")


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame`` as .csv (every column) or .md (the printed columns, a Markdown table)."""
    path = Path(path)
    check_out(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
        return path
    lines = table_lines(frame)
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines[1:]]
    path.write_text("\n".join([*md, "", LEGEND, ""]))
    return path
