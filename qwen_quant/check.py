"""`qwen-quant check`: the CI gate. Compare a report with a baseline report and/or absolute limits.

Results are matched by (recipe artifact name, artifact type, backend) -- the artifact name is the
file or folder name for reports not made by a recipe -- because paths differ between machines. Two
results are only comparable when they measured the same tokens the same way: the dataset sha256,
ctx and perplexity method must agree, else the input is unusable (exit 2), not a regression.

Limits, per artifact: the recipe's thresholds (carried in ``extra.recipe.artifacts[].thresholds``),
overridden by command-line flags. ``max_ppl_increase`` is relative to the baseline's perplexity
(default 1% when a baseline is given); ``max_ppl_ratio``, ``max_kl`` (mean KL) and ``min_top1`` are
absolute. An artifact that the baseline has and the report lacks, or that failed to build, is a
regression too.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_quant.errors import QuantError

DEFAULT_MAX_PPL_INCREASE = 0.01
# threshold -> (metric, kind): "rel" compares with the baseline, "max"/"min" are absolute limits
LIMITS = {"max_ppl_increase": ("perplexity", "rel"), "max_ppl_ratio": ("ppl_ratio", "max"),
          "max_kl": ("kl_mean", "max"), "min_top1": ("top1_agreement", "min")}


@dataclass
class CheckConfig:
    report: str
    baseline: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # command-line limits (override the recipe's)
    update_baseline: bool = False


@dataclass
class Finding:
    artifact: str
    backend: str
    metric: str
    baseline: Any
    now: Any
    limit: str
    regressed: bool

    def line(self) -> str:
        word = "REGRESSION" if self.regressed else "ok"
        return f"{word}: {self.artifact} on {self.backend}: {self.metric} baseline {_fmt(self.baseline)} now {_fmt(self.now)} (limit {self.limit})"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def load_report(path: str | Path, what: str = "report") -> dict:
    """Read and schema-check a report; any problem is a QuantError (exit 2)."""
    from qwen_quant.report import validate_report

    p = Path(path)
    if not p.is_file():
        raise QuantError(f"{what} {p} does not exist; pass the report.json that `qwen-quant run` wrote")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantError(f"{what} {p} is not valid JSON ({err}); regenerate it with `qwen-quant run`") from None
    try:
        validate_report(d)
    except Exception as err:  # jsonschema.ValidationError
        where = "/".join(str(x) for x in getattr(err, "absolute_path", [])) or "(top level)"
        raise QuantError(f"{what} {p} does not follow the report schema at {where}: {getattr(err, 'message', err)}") from None
    return d


def result_key(r: dict) -> tuple[str, str, str]:
    name = (r.get("extra") or {}).get("artifact") or Path(r["artifact"]["path"]).name
    return name, r["artifact"].get("type") or r["artifact"]["format"], r["backend"]["name"]


def _label(key: tuple[str, str, str]) -> str:
    return f"{key[0]} [{key[1]}]" if key[1] and key[1] not in key[0] else key[0]


def _recipe_artifacts(d: dict) -> dict[str, dict]:
    return {a["name"]: a for a in (d.get("extra") or {}).get("recipe", {}).get("artifacts", [])}


def _limits(key, report: dict, cli: dict[str, float], has_baseline: bool) -> dict[str, float]:
    lim = dict(_recipe_artifacts(report).get(key[0], {}).get("thresholds") or {})
    lim.update(cli)
    if has_baseline:
        lim.setdefault("max_ppl_increase", DEFAULT_MAX_PPL_INCREASE)
    else:
        lim.pop("max_ppl_increase", None)
    return lim


def _comparable(key, now: dict, base: dict) -> None:
    for field_, get in (("dataset sha256", lambda r: r["dataset"]["sha256"]), ("ctx", lambda r: r["ctx"]),
                        ("ppl_method", lambda r: r["ppl_method"])):
        if get(now) != get(base):
            raise QuantError(f"{_label(key)} on {key[2]}: {field_} differs from the baseline ({get(base)} vs {get(now)}), "
                             "so the numbers are not comparable; evaluate on the same data and settings, or "
                             "replace the baseline with --update-baseline")


def compare(report: dict, baseline: dict | None, cli: dict[str, float] | None = None) -> list[Finding]:
    """Every limit checked, for every (artifact, backend) of the report; regressed ones flagged."""
    cli = cli or {}
    now = {result_key(r): r for r in report["results"]}
    base = {result_key(r): r for r in baseline["results"]} if baseline else {}
    out: list[Finding] = []
    for key, r in now.items():
        b = base.get(key)
        if b is not None:
            _comparable(key, r, b)
        for name, limit in _limits(key, report, cli, baseline is not None).items():
            metric, kind = LIMITS[name]
            v = r["metrics"].get(metric)
            bv = None if b is None else b["metrics"].get(metric)
            if kind == "rel":
                if b is None or v is None or bv is None:
                    continue
                bad = v > bv * (1 + limit)
                out.append(Finding(_label(key), key[2], metric, bv, v, f"+{limit:.2%} -> {bv * (1 + limit):.6g}", bad))
            elif v is None:
                out.append(Finding(_label(key), key[2], metric, bv, None, f"{name} {limit:g} (metric missing)", True))
            else:
                bad = v > limit if kind == "max" else v < limit
                out.append(Finding(_label(key), key[2], metric, bv, v, f"{'<=' if kind == 'max' else '>='} {limit:g}", bad))
    for key in base.keys() - now.keys():
        out.append(Finding(_label(key), key[2], "result", "present", "missing", "must be present", True))
    for name, a in _recipe_artifacts(report).items():
        if a.get("status") not in ("ok", "cached", None):
            out.append(Finding(name, ",".join(a.get("backends", [])) or "-", "status", "ok", a.get("status"),
                               f"built and validated ({a.get('error') or 'no error recorded'})", True))
    return out


def run_check(cfg: CheckConfig, echo=print) -> int:
    """0: no regression; 1: a regression (each printed with artifact, backend, metric, baseline, now, limit)."""
    report = load_report(cfg.report)
    if cfg.update_baseline:
        if not cfg.baseline:
            raise QuantError("--update-baseline needs --baseline FILE (where to write the new baseline)")
        dest = Path(cfg.baseline)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(cfg.report, tmp)
        tmp.replace(dest)
        echo(f"baseline {dest} replaced by {cfg.report} ({len(report['results'])} results)")
        return 0
    if "max_ppl_increase" in cfg.thresholds and not cfg.baseline:
        raise QuantError("--max-ppl-increase compares with a baseline; pass --baseline FILE (or use --max-ppl-ratio)")
    baseline = load_report(cfg.baseline, "baseline") if cfg.baseline else None
    findings = compare(report, baseline, cfg.thresholds)
    bad = [f for f in findings if f.regressed]
    for f in bad:
        echo(f.line())
    if not findings:
        echo("nothing to check: give --baseline or limits (--max-kl, --min-top1, or thresholds in the recipe)")
    verdict = f"{len(bad)} regression(s)" if bad else "no regression"
    echo(f"{verdict} in {len(findings)} check(s) over {len(report['results'])} result(s)")
    return 1 if bad else 0
