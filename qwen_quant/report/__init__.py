"""One report schema for every artifact and backend, and its table renderings.

A report is JSON (schema in `schema.json`, id ``qwen-quant/report/v2``; v1 reports, which lack the
optional ``phases``/``metadata``/``notes`` fields, still validate and `check` reads them) holding one ``result`` per
(artifact, backend) pair: what was measured, on which device and library versions, on which
token stream (by hash), and how long it took. `qwen-quant check` and CI read this file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_ID = "qwen-quant/report/v2"
SCHEMA_PATH = Path(__file__).with_name("schema.json")


@dataclass
class Result:
    artifact: dict[str, Any]  # path, format, size_bytes, (optional) type
    backend: dict[str, Any]  # name, device, dtype, versions
    dataset: dict[str, Any]  # name, sha256, n_tokens
    ctx: int
    ppl_method: str
    metrics: dict[str, Any]
    wall_time_s: float
    reference: dict[str, Any] | None = None  # path, backend, device, dtype
    extra: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # v2: wall seconds per phase (load, scoring, greedy)
    metadata: dict[str, Any] | None = None  # v2: artifact metadata parity ({ok, checks: [...]})
    notes: list[str] = field(default_factory=list)  # v2: mode chosen, steps skipped and why


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. quantization summary

    def to_dict(self) -> dict[str, Any]:
        from qwen_quant import __version__

        return {
            "schema": SCHEMA_ID,
            "tool": {"name": "qwen-quant", "version": __version__},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": {"platform": platform.platform(), "python": platform.python_version()},
            "results": [asdict(r) for r in self.results],
            "extra": self.extra,
        }

    def write_json(self, path: str | Path) -> Path:
        """Write atomically (temp name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        return cls(results=[Result(**r) for r in d.get("results", [])], extra=d.get("extra", {}))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(d: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if ``d`` is not a valid report."""
    import jsonschema

    jsonschema.validate(d, load_schema())


# Columns shown in tables: (metric key, header, format)
COLUMNS = [
    ("perplexity", "PPL", "{:.4f}"),
    ("ppl_ratio", "PPL/ref", "{:.4f}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("kl_p99", "KL p99", "{:.2e}"),
    ("top1_agreement", "top-1", "{:.2%}"),
    ("greedy", "greedy exact", "{}"),
    ("greedy_prefix_mean", "greedy prefix", "{:.1f}"),
]


def _cells(r: Result) -> list[str]:
    m = dict(r.metrics)
    if "greedy_exact" in m:
        m["greedy"] = f"{m['greedy_exact']}/{m['greedy_prompts']}"
    row = [Path(r.artifact.get("path", "?")).name + (f" [{r.artifact['type']}]" if r.artifact.get("type") else ""),
           r.backend.get("name", "?"), r.backend.get("device", "?")]
    for key, _, fmt in COLUMNS:
        v = m.get(key)
        row.append("-" if v is None else fmt.format(v))
    size = r.artifact.get("size_bytes")
    row.append("-" if size is None else f"{size / 2**20:.1f} MiB")
    row.append(f"{r.wall_time_s:.1f}s")
    return row


HEADERS = ["artifact", "backend", "device"] + [h for _, h, _ in COLUMNS] + ["size", "time"]


EXPERT_HEADERS = ["experts", "routed calibration tokens per expert", "rounded to nearest (< min tokens)"]


def expert_rows(report: Report) -> list[list[str]]:
    """One row per Mixture-of-Experts layer of a quantization summary (``extra.quantize.moe``): the
    tokens routed to each expert, in expert order, and the experts quantized with round-to-nearest
    instead because fewer than ``min_tokens`` reached them; [] for a dense model."""
    moe = (report.extra.get("quantize") or {}).get("moe")
    if not moe:
        return []
    fallback: dict[str, list[str]] = {}
    for name in moe.get("fallback_rtn", []):  # ...mlp.experts.{e}.gate_proj -> {...mlp.experts: [e]}
        experts, _, rest = name.rpartition(".")[0].rpartition(".")
        if rest not in fallback.setdefault(experts, []):
            fallback[experts].append(rest)
    rows = []
    for experts, counts in moe.get("routed_tokens", {}).items():
        low = fallback.get(experts, [])
        rows.append([experts, " ".join(str(c) for c in counts),
                     ", ".join(f"{e} ({counts[int(e)]})" for e in low) if low else "none"])
    return rows


def to_markdown(report: Report) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report.results]
    rows = expert_rows(report)
    if rows:
        moe = report.extra["quantize"]["moe"]
        lines += ["", f"Experts (calibrate {moe['calibrate']}, min tokens {moe['min_tokens']}):", "",
                  "| " + " | ".join(EXPERT_HEADERS) + " |", "|" + "---|" * len(EXPERT_HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_expert_table(report: Report) -> None:
    rows = expert_rows(report)
    if not rows:
        return
    import sys

    from rich.console import Console
    from rich.table import Table

    moe = report.extra["quantize"]["moe"]
    table = Table(title=f"experts (calibrate {moe['calibrate']}, min tokens {moe['min_tokens']})")
    for h in EXPERT_HEADERS:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def print_table(report: Report, title: str = "qwen-quant report") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("artifact", "backend", "device") else "right")
    for r in report.results:
        table.add_row(*_cells(r))
    import sys

    # a pipe or CI log gets a wide table instead of rich's 80-column default, so no cell is cut
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def emit(report: Report, json_path=None, title: str = "qwen-quant report") -> None:
    """What every command does with its report: the table (unless there are no results), and the JSON
    written to ``json_path`` when given; ``-`` prints the JSON to stdout instead of the table."""
    json_path = json_path or None
    if json_path is not None and str(json_path) == "-":
        print(json.dumps(report.to_dict(), indent=2, default=_json_default))
        return
    if report.results:
        print_table(report, title=title)
    print_expert_table(report)
    if json_path is not None:
        report.write_json(json_path)
        print(f"report written to {json_path}")
