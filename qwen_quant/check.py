"""`qwen-quant check`: the CI gate. Compare a report with a baseline report and/or absolute limits.

Results are matched by (recipe artifact name, artifact type, backend) -- the artifact name is the
file or folder name for reports not made by a recipe -- because paths differ between machines. A
result left unmatched by name is then matched by role: the same artifact type (else format) and
backend, and the same place among the results of that role (a re-evaluated copy in a folder of
another name is still compared, not reported missing); ``--match NOW=BASE`` maps names explicitly.
When the baseline and the report share no result at all, the input is unusable (exit 2). Two
results are only comparable when they measured the same tokens the same way: the dataset sha256,
ctx and perplexity method must agree, else the input is unusable (exit 2), not a regression.

Limits, per artifact: the recipe's thresholds (carried in ``extra.recipe.artifacts[].thresholds``),
overridden by command-line flags, on top of defaults (docs/gate.md says how they were chosen):

- with a baseline: perplexity +1% (``max_ppl_increase``); mean KL may grow by a fraction of the
  baseline's (``max_kl_increase``) that depends on the backend's measured noise (`NOISE_DEFAULTS`:
  10% on the bit-repeatable CPU backends, 50% elsewhere), but a growth below the absolute floor
  ``kl_floor`` (2e-4) never fails, because a near-lossless artifact's KL is tiny and its relative
  changes are noise; top-1 agreement may drop by 0.5 points (``max_top1_drop``), and always by more
  than one token's worth of the scored tokens; greedy parity may lose at most
  ``max_greedy_exact_drop`` exactly matching prompts and ``max_greedy_prefix_drop`` of the baseline's
  mean matching prefix (per noise class too);
- without a baseline: absolute limits per artifact class (`TYPE_DEFAULTS`, from the shipped
  fixtures): ``max_ppl_ratio``, ``max_kl`` (mean KL) and ``min_top1`` against the reference.

A failed metadata check named in ``allow`` (``--allow 'generation temperature'``: a change the user
made on purpose) is accepted. Any other failed metadata check (tokenizer, special tokens, chat template, context/rope/eps, g_idx: see
`qwen_quant.validate.metadata`) is a regression with its own one-line reason. An artifact that the
baseline has and the report lacks, or that failed to build, is a regression too. A report with
nothing to check (no baseline, no limits, no reference metrics) is unusable input (exit 2).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_quant.errors import QuantError

DEFAULT_MAX_PPL_INCREASE = 0.01
# with a baseline (see docs/gate.md for the noise these were chosen against)
BASELINE_DEFAULTS = {"max_ppl_increase": DEFAULT_MAX_PPL_INCREASE, "max_kl_increase": 0.5, "kl_floor": 2e-4,
                     "max_top1_drop": 0.005}
# per backend noise class, over BASELINE_DEFAULTS: torch, llama.cpp and onnxruntime on the CPU repeat bit for
# bit (bench/gate_noise.py, docs/gate.md), so a relative KL growth of 10% is already damage there; elsewhere
# (GPU kernels, vLLM's batching) the looser limits stay until noise is measured on that hardware
NOISE_DEFAULTS = {
    "zero": {"max_kl_increase": 0.10, "max_greedy_exact_drop": 1, "max_greedy_prefix_drop": 0.15},
    "noisy": {"max_kl_increase": 0.5, "max_greedy_exact_drop": 2, "max_greedy_prefix_drop": 0.35},
}
ZERO_NOISE = {("torch", "cpu"), ("llama.cpp", "cpu"), ("onnxruntime", "cpu")}
# without a baseline: absolute limits per artifact class, from the shipped fixtures (docs/gate.md)
TYPE_DEFAULTS = {
    "float": {"max_ppl_ratio": 1.01, "max_kl": 0.002, "min_top1": 0.98},
    "8bit": {"max_ppl_ratio": 1.03, "max_kl": 0.01, "min_top1": 0.95},
    # FP8 e4m3 W8A8 (weights and activations rounded): worst clean part KL 2e-3, ratio 1.011, top-1 96%
    # over 4 fixtures x 2 schemes x 4 text parts (bench/fp8_noise.py, docs/gate.md)
    "fp8": {"max_ppl_ratio": 1.02, "max_kl": 0.006, "min_top1": 0.94},
    "4bit": {"max_ppl_ratio": 1.10, "max_kl": 0.05, "min_top1": 0.85},
    "low": {"max_ppl_ratio": 1.6, "max_kl": 0.4, "min_top1": 0.65},
}
# threshold -> (metric, kind): "rel"/"rel_kl"/"drop" compare with the baseline, "max"/"min" are absolute limits
LIMITS = {"max_ppl_increase": ("perplexity", "rel"), "max_kl_increase": ("kl_mean", "rel_kl"),
          "max_top1_drop": ("top1_agreement", "drop"), "max_ppl_ratio": ("ppl_ratio", "max"),
          "max_kl": ("kl_mean", "max"), "min_top1": ("top1_agreement", "min"),
          "max_greedy_exact_drop": ("greedy_exact", "count_drop"), "max_greedy_prefix_drop": ("greedy_prefix_mean", "rel_drop")}
PARAMS = ("kl_floor",)  # modify a limit, are not limits themselves
BASELINE_ONLY = ("max_ppl_increase", "max_kl_increase", "max_top1_drop", "max_greedy_exact_drop", "max_greedy_prefix_drop")


def noise_class(r: dict) -> str:
    """'zero' for the backends measured bit-repeatable (CPU torch, llama.cpp, onnxruntime), else 'noisy'."""
    b = r.get("backend") or {}
    dev = str(b.get("device") or "").split(":")[0]
    return "zero" if (b.get("name"), dev) in ZERO_NOISE else "noisy"


CLASS_WORDS = (("fp8", ("fp8", "float8", "e4m3")), ("low", ("q2", "q3", "int2", "int3", "iq1", "iq2", "iq3")), ("8bit", ("q8", "q6", "int8")),
               ("4bit", ("q4", "q5", "int4", "iq4", "gptq", "awq", "compressed-tensors")),
               ("float", ("f32", "f16", "bf16", "float", "fp32", "fp16")))


def artifact_class(r: dict) -> str:
    """fp8, float, 8bit, 4bit or low: which absolute defaults a result gets (artifact type, then format, then dtype)."""
    a, b = r.get("artifact") or {}, r.get("backend") or {}
    for text in (a.get("type"), a.get("format"), b.get("dtype")):
        text = str(text or "").lower()
        for cls, words in CLASS_WORDS:
            if any(w in text for w in words):
                return cls
    return "float"


@dataclass
class CheckConfig:
    report: str
    baseline: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # command-line limits (override the recipe's)
    update_baseline: bool = False
    match: dict[str, str] = field(default_factory=dict)  # report artifact name -> baseline artifact name
    allow: list[str] = field(default_factory=list)  # metadata check names accepted as intended changes


@dataclass
class Finding:
    artifact: str
    backend: str
    metric: str
    baseline: Any
    now: Any
    limit: str
    regressed: bool
    reason: str = ""  # metadata findings: the check's own one-line reason

    def line(self) -> str:
        word = "REGRESSION" if self.regressed else "ok"
        if self.reason:
            return f"{word}: {self.artifact} on {self.backend}: {self.metric}: {self.reason}"
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


def _limits(key, r: dict, report: dict, cli: dict[str, float], has_baseline: bool) -> dict[str, float]:
    lim = {**BASELINE_DEFAULTS, **NOISE_DEFAULTS[noise_class(r)]} if has_baseline else dict(TYPE_DEFAULTS[artifact_class(r)])
    lim.update(_recipe_artifacts(report).get(key[0], {}).get("thresholds") or {})
    lim.update(cli)
    if not has_baseline:
        for k in BASELINE_ONLY:
            lim.pop(k, None)
    return lim


def _comparable(key, now: dict, base: dict) -> None:
    for field_, get in (("dataset sha256", lambda r: r["dataset"]["sha256"]), ("ctx", lambda r: r["ctx"]),
                        ("ppl_method", lambda r: r["ppl_method"])):
        if get(now) != get(base):
            raise QuantError(f"{_label(key)} on {key[2]}: {field_} differs from the baseline ({get(base)} vs {get(now)}), "
                             "so the numbers are not comparable; evaluate on the same data and settings, or "
                             "replace the baseline with --update-baseline")


def _finding(key, name: str, limit: float, lim: dict, v, bv) -> Finding | None:
    metric, kind = LIMITS[name]
    label = _label(key)
    if kind in ("count_drop", "rel_drop"):
        if v is None or bv is None:
            return None
        cap = bv - limit if kind == "count_drop" else bv * (1 - limit)
        what = f"drop <= {limit:g} prompt(s)" if kind == "count_drop" else f"drop <= {limit:.0%}"
        return Finding(label, key[2], metric, bv, v, f"{what} -> {cap:.6g} ({lim.get('_noise', '?')}-noise backend)",
                       v < cap - 1e-9)
    if kind in ("rel", "rel_kl", "drop"):
        if v is None or bv is None:
            return None
        if kind == "rel":
            return Finding(label, key[2], metric, bv, v, f"+{limit:.2%} -> {bv * (1 + limit):.6g}", v > bv * (1 + limit))
        if kind == "rel_kl":
            floor = lim.get("kl_floor", 0.0)
            cap = max(bv * (1 + limit), bv + floor)
            return Finding(label, key[2], metric, bv, v, f"+{limit:.0%} or +{floor:g} -> {cap:.6g} "
                           f"({lim.get('_noise', '?')}-noise backend)", v > cap)
        n = lim.get("_tokens") or 0  # one token flip is 100/n points: a drop must be more than one flip
        allowed = max(limit, 1.5 / n) if n else limit
        return Finding(label, key[2], metric, bv, v, f"drop <= {allowed * 100:.2g} points -> {bv - allowed:.6g}",
                       v < bv - allowed)
    if v is None:
        return Finding(label, key[2], metric, bv, None, f"{name} {limit:g} (metric missing)", True)
    bad = v > limit if kind == "max" else v < limit
    return Finding(label, key[2], metric, bv, v, f"{'<=' if kind == 'max' else '>='} {limit:g}", bad)


def _metadata_findings(key, r: dict, allow: list[str] | None = None) -> list[Finding]:
    from qwen_quant.validate.metadata import failed_reasons

    md = r.get("metadata")
    if not md:
        return []
    allow = set(allow or ())
    md = {**md, "checks": [c for c in md.get("checks", []) if c.get("name") not in allow]}
    reasons = failed_reasons(md)
    if not reasons:
        return [Finding(_label(key), key[2], "metadata", None, "ok", "metadata parity", False)]
    return [Finding(_label(key), key[2], "metadata", None, None, "metadata parity", True, reason=x) for x in reasons]


def _role(r: dict) -> tuple[str, str]:
    return r["artifact"].get("type") or r["artifact"]["format"], r["backend"]["name"]


def match_results(now: dict, base: dict, match: dict[str, str] | None = None) -> dict:
    """report key -> baseline key: by name, then ``match`` (report name -> baseline name), then by role.

    Role: the same artifact type (else format) and backend, and the same place among the unmatched
    results of that role in each report's order (a recipe's artifact order, or the order of eval).
    """
    match = match or {}
    names_now, names_base = {k[0] for k in now}, {k[0] for k in base}
    for a, b in match.items():
        if a not in names_now or b not in names_base:
            raise QuantError(f"--match {a}={b}: {a if a not in names_now else b} is not an artifact of the "
                             f"{'report' if a not in names_now else 'baseline'} (report has {sorted(names_now)}, "
                             f"baseline has {sorted(names_base)})")
    pairs = {k: k for k in now if k in base and k[0] not in match}
    for k in now:
        if k[0] in match:
            want = (match[k[0]], k[1], k[2])
            if want in base:
                pairs[k] = want
    left_now = [k for k in now if k not in pairs]
    left_base = [k for k in base if k not in set(pairs.values()) and k[0] not in match.values()]
    by_role: dict[tuple, list] = {}
    for k in left_base:
        by_role.setdefault(_role(base[k]), []).append(k)
    for k in left_now:
        cands = by_role.get(_role(now[k]))
        if cands:
            pairs[k] = cands.pop(0)
    return pairs


def compare(report: dict, baseline: dict | None, cli: dict[str, float] | None = None,
            match: dict[str, str] | None = None, allow: list[str] | None = None) -> list[Finding]:
    """Every limit checked, for every (artifact, backend) of the report; regressed ones flagged."""
    cli = cli or {}
    now = {result_key(r): r for r in report["results"]}
    base = {result_key(r): r for r in baseline["results"]} if baseline else {}
    pairs = match_results(now, base, match) if baseline else {}
    if baseline and now and base and not pairs:
        raise QuantError(f"no result of the report ({', '.join(_label(k) + ' on ' + k[2] for k in now)}) matches one of the "
                         f"baseline ({', '.join(_label(k) + ' on ' + k[2] for k in base)}) by name or by role (artifact "
                         "type and backend); map them with --match NOW=BASE or compare with the right baseline")
    out: list[Finding] = []
    for key, r in now.items():
        b = base.get(pairs.get(key))
        if b is not None:
            _comparable(key, r, b)
        out += _metadata_findings(key, r, allow)
        lim = _limits(key, r, report, cli, baseline is not None)
        lim["_noise"] = noise_class(r)
        for name, limit in list(lim.items()):
            lim["_tokens"] = min(r["metrics"].get("tokens_scored") or 0, (b or r)["metrics"].get("tokens_scored") or 0)
            if name in PARAMS or name.startswith("_"):
                continue
            metric = LIMITS[name][0]
            v = r["metrics"].get(metric)
            if LIMITS[name][1] in ("max", "min") and v is None and name not in cli and metric != "perplexity" \
                    and r.get("reference") is None:
                continue  # a default limit on a reference metric that this (reference-less) result cannot have
            f = _finding(key, name, limit, lim, v, None if b is None else b["metrics"].get(metric))
            if f is not None:
                out.append(f)
    for key in base.keys() - set(pairs.values()):
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
    rel = [k for k in BASELINE_ONLY if k in cfg.thresholds]
    if rel and not cfg.baseline:
        flag = "--" + rel[0].replace("_", "-")
        raise QuantError(f"{flag} compares with a baseline; pass --baseline FILE (or use --max-ppl-ratio/--max-kl/--min-top1)")
    baseline = load_report(cfg.baseline, "baseline") if cfg.baseline else None
    findings = compare(report, baseline, cfg.thresholds, cfg.match, cfg.allow)
    if not findings:
        raise QuantError(f"nothing to check in {cfg.report}: no baseline, no limits, and no result was measured against "
                         "a reference; pass --baseline FILE, limits (--max-ppl-ratio, --max-kl, --min-top1), or "
                         "evaluate with --reference")
    bad = [f for f in findings if f.regressed]
    for f in bad:
        echo(f.line())
    verdict = f"{len(bad)} regression(s)" if bad else "no regression"
    echo(f"{verdict} in {len(findings)} check(s) over {len(report['results'])} result(s)")
    return 1 if bad else 0
