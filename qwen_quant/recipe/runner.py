"""`run_recipe`: source (+ v1 conversion) -> every artifact -> validation on its backends -> one report.

The reference model is loaded once per run and kept (with its greedy tokens) for every validation
(`validate.References`; layer-streamed validations re-stream it). Each artifact is built by the same function its CLI command calls (`quantize_model`, `export_gguf`,
`export_onnx`) with validation off, then measured here by `run_eval` on every backend the recipe
names, with the recipe's one `EvalConfig`, so all rows of the report are comparable. A failing
artifact is recorded (status ``failed`` with its error) and the run goes on; Ctrl-C records the
artifact in flight as ``interrupted``, writes the report of what is done, and re-raises.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_quant.errors import QuantError
from qwen_quant.progress import log
from qwen_quant.recipe import state as st
from qwen_quant.recipe.schema import FIXTURE_PREFIX, ArtifactSpec, Recipe
from qwen_quant.report import Report, Result, to_markdown

REFS: contextvars.ContextVar = contextvars.ContextVar("qwen_quant_refs", default=None)  # set by run_recipe
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class RunConfig:
    """What `qwen-quant run` takes besides the recipe."""

    output: str | None = None  # default: ./<recipe name>-out
    only: list[str] | None = None
    json: str | None = None  # also write the combined report here


@dataclass
class Outcome:
    report: Report
    statuses: dict[str, str] = field(default_factory=dict)  # artifact -> ok | cached | failed | interrupted
    outdir: Path = Path(".")

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.statuses.items() if s not in ("ok", "cached")]


def resolve_source(recipe: Recipe, outdir: Path, state: st.State) -> Path:
    """The qwen2 checkpoint the artifacts are made from (converted from Qwen v1 when asked, cached)."""
    from qwen_quant.models.loader import resolve_model

    ref = recipe.source.model
    if ref.startswith(FIXTURE_PREFIX):
        from qwen_quant.fixtures import fixture_path

        src = fixture_path(ref[len(FIXTURE_PREFIX):])
    elif recipe.source.convert:
        src = Path(ref).expanduser()
        if not src.is_dir():
            src = resolve_model(ref)
    else:
        src = resolve_model(ref)
    if not recipe.source.convert:
        return src
    from qwen_quant.models.convert.qwen_v1 import ConvertConfig, convert_qwen_v1

    out = outdir / f"{src.name}-qwen2"
    k = st.key("convert", st.path_fingerprint(src), recipe.source.allow_pickle)
    prev = state.data.get("convert") or {}
    if prev.get("key") == k and prev.get("outputs_fp") == st.outputs_fingerprint([str(out)]):
        log(f"[dim]skip convert: {out} is up to date[/dim]")
        return out
    log(f"converting Qwen v1 {src} -> {out}")
    convert_qwen_v1(ConvertConfig(model=src, output=out, force=True, allow_pickle=recipe.source.allow_pickle))
    state.data["convert"] = {"key": k, "output": str(out), "outputs_fp": st.outputs_fingerprint([str(out)])}
    state.save()
    return out


def _type_name(spec: ArtifactSpec, gguf_type: str | None = None) -> str:
    c = spec.config
    if spec.type in ("gptq", "rtn", "awq"):
        return f"{spec.type}-int{c.bits}"
    if spec.type == "gguf":
        return f"gguf-{gguf_type}"
    if spec.type == "fp8":
        return c.artifact_type
    return "onnx-" + ("int4" if c.int4 else "int8" if c.int8 else "fp16" if c.fp16 else "fp32")


def build(spec: ArtifactSpec, src: Path, outdir: Path, device: str) -> list[tuple[str, str]]:
    """Write the artifact under ``outdir/<name>``; returns (path, report type) per output."""
    target = outdir / spec.name
    if spec.type in ("gptq", "rtn", "awq"):
        from qwen_quant.quantize import quantize_model  # the config's type picks the method
        cfg = dataclasses.replace(spec.config, model=str(src), output=str(target), force=True, validate=False, device=device)
        out, _ = quantize_model(cfg)
        return [(str(out), _type_name(spec))]
    if spec.type == "fp8":
        from qwen_quant.quantize.fp8 import quantize_fp8

        cfg = dataclasses.replace(spec.config, model=str(src), output=str(target), force=True, validate=False, device=device)
        out, _ = quantize_fp8(cfg)
        return [(str(out), _type_name(spec))]
    if spec.type == "gguf":
        from qwen_quant.export.gguf_export import export_gguf

        cfg = dataclasses.replace(spec.config, model=str(src), outdir=str(target), force=True, validate=False, json=None)
        paths = export_gguf(cfg)
        return [(str(p), _type_name(spec, t)) for p, t in zip(paths, cfg.check())]
    from qwen_quant.export.onnx import export_onnx

    cfg = dataclasses.replace(spec.config, model=str(src), output=str(target), force=True, validate=False, json=None)
    return [(str(export_onnx(cfg)), _type_name(spec))]


def validate(spec: ArtifactSpec, outputs: list[tuple[str, str]], src: Path, recipe: Recipe) -> list[dict]:
    """Perplexity + parity of every output on every backend the recipe names, against the source.

    Inside `run_recipe`, ``REFS`` (`validate.References`) keeps the source model loaded, and its
    greedy tokens, across the artifacts of the run.
    """
    refs = REFS.get()
    from qwen_quant.validate import run_eval

    if spec.type == "gguf":
        from qwen_quant.backends.llamacpp import check_tokenizer
        from qwen_quant.export.gguf_export import TOKENIZER_CHECK_TEXTS
        from qwen_quant.models.loader import load_tokenizer

        check_tokenizer(outputs[0][0], load_tokenizer(src), TOKENIZER_CHECK_TEXTS)
    results = []
    for path, kind in outputs:
        for backend in spec.backends:
            log(f"validating {Path(path).name} [{kind}] on {backend}")
            r = run_eval(path, recipe.eval, reference=src, backend=backend, device=recipe.device,
                         ref_device=None if backend == "torch" else "cpu", artifact_type=kind, refs=refs)
            r.extra = {**r.extra, "artifact": spec.name}
            results.append(dataclasses.asdict(r))
    return results


def _keys(spec: ArtifactSpec, src_fp: str, recipe: Recipe) -> tuple[str, str]:
    c = spec.config
    data = c.calib.source if hasattr(c, "calib") and not isinstance(c.calib, str) else getattr(c, "calib", "shipped")
    bkey = st.key("build", spec.type, st.config_key(c), src_fp, st.data_fingerprint(data), recipe.device)
    ekey = st.key("eval", bkey, dataclasses.asdict(recipe.eval), st.data_fingerprint(recipe.eval.data), spec.backends)
    return bkey, ekey


def _build_one(spec: ArtifactSpec, src: Path, src_fp: str, recipe: Recipe, outdir: Path, state: st.State) -> str:
    """Build (or find built) one artifact: "cached" (built and validated with the same inputs) or "built"."""
    bkey, ekey = _keys(spec, src_fp, recipe)
    entry = dict(state.artifact(spec.name))
    if state.built(spec.name, bkey) and entry.get("eval_key") == ekey and entry.get("status") in ("ok", "cached"):
        log(f"[dim]skip {spec.name}: built and validated with the same inputs[/dim]")
        state.set_artifact(spec.name, {**entry, "status": "cached"})
        return "cached"
    if state.built(spec.name, bkey):
        log(f"[dim]{spec.name}: already built, validating[/dim]")
        return "built"
    t0 = time.perf_counter()
    entry = {"type": spec.type, "status": "building", "build_key": bkey, "outputs": [], "results": []}
    state.set_artifact(spec.name, entry)
    log(f"[bold]building {spec.name}[/bold] ({spec.type})")
    outputs = build(spec, src, outdir, recipe.device)
    entry.update(typed_outputs=[list(o) for o in outputs], outputs=[p for p, _ in outputs],
                 build_s=round(time.perf_counter() - t0, 2), outputs_fp=st.outputs_fingerprint([p for p, _ in outputs]),
                 status="built")
    state.set_artifact(spec.name, entry)
    return "built"


def _validate_one(spec: ArtifactSpec, src: Path, src_fp: str, recipe: Recipe, state: st.State) -> str:
    _, ekey = _keys(spec, src_fp, recipe)
    entry = dict(state.artifact(spec.name))
    t1 = time.perf_counter()
    results = validate(spec, [tuple(o) for o in entry["typed_outputs"]], src, recipe)
    entry.update(results=results, eval_key=ekey, validate_s=round(time.perf_counter() - t1, 2), status="ok",
                 error=None, size_bytes=sum(r for _, r, _ in _sizes(entry["outputs"])))
    state.set_artifact(spec.name, entry)
    return "ok"


def _sizes(paths: list[str]):
    for row in st.outputs_fingerprint(paths):
        yield row[0], row[1] or 0, row[2]


def run_recipe(recipe: Recipe, cfg: RunConfig | None = None) -> Outcome:
    """Run every (or every ``only``) artifact of ``recipe``; returns the combined report and statuses."""
    cfg = cfg or RunConfig()
    outdir = Path(cfg.output or f"{recipe.name}-out").expanduser()
    names = [a.name for a in recipe.artifacts]
    for n in cfg.only or []:
        recipe.artifact(n)  # raises for an unknown name
    todo = [a for a in recipe.artifacts if not cfg.only or a.name in cfg.only]
    outdir.mkdir(parents=True, exist_ok=True)
    state = st.State(outdir)
    src = resolve_source(recipe, outdir, state)
    src_fp = st.path_fingerprint(src)
    statuses: dict[str, str] = {}
    from qwen_quant.validate import References

    refs = References()  # the source model: loaded once for all validations, after all builds
    try:
        token = REFS.set(refs)
        for spec in todo:
            _guarded(spec, state, statuses, lambda: _build_one(spec, src, src_fp, recipe, outdir, state))
            if statuses.get(spec.name) == "built":
                _guarded(spec, state, statuses, lambda: _validate_one(spec, src, src_fp, recipe, state))
    finally:
        REFS.reset(token)
        refs.close()
        report = combined_report(recipe, state, src, names)
        write_reports(report, outdir, cfg.json)
    return Outcome(report=report, statuses=statuses, outdir=outdir)


def _guarded(spec: ArtifactSpec, state: st.State, statuses: dict[str, str], step) -> None:
    """Run one artifact's step; a failure is recorded and the run goes on, Ctrl-C is recorded and re-raised."""
    try:
        statuses[spec.name] = step()
    except KeyboardInterrupt:
        _record_failure(state, spec, "interrupted", "interrupted (Ctrl-C); rerun to resume")
        statuses[spec.name] = "interrupted"
        raise
    except Exception as err:  # noqa: BLE001 - one bad artifact must not stop the others
        msg = str(err) if isinstance(err, QuantError) else f"{type(err).__name__}: {err}"
        log(f"[red]{spec.name} failed:[/red] {msg}")
        if not isinstance(err, QuantError) and os.environ.get("QWEN_QUANT_DEBUG"):
            traceback.print_exc()
        _record_failure(state, spec, "failed", msg)
        statuses[spec.name] = "failed"


def _record_failure(state: st.State, spec: ArtifactSpec, status: str, msg: str) -> None:
    entry = dict(state.artifact(spec.name))
    entry.update(type=spec.type, status=status, error=msg, results=[] if status == "failed" else entry.get("results", []))
    if entry.get("eval_key") and status == "interrupted":
        entry["eval_key"] = None  # validation did not finish: redo it, keep the build if it completed
    state.set_artifact(spec.name, entry)


def combined_report(recipe: Recipe, state: st.State, src: Path, names: list[str]) -> Report:
    """One report in the common schema; recipe, statuses and `check` thresholds under extra.recipe."""
    results, arts = [], []
    for spec in recipe.artifacts:
        e = state.artifact(spec.name)
        if spec.name in names:
            results += [Result(**r) for r in e.get("results", [])]
        arts.append({"name": spec.name, "type": spec.type, "status": e.get("status", "not run"), "error": e.get("error"),
                     "outputs": e.get("outputs", []), "size_bytes": e.get("size_bytes"), "build_s": e.get("build_s"),
                     "validate_s": e.get("validate_s"), "backends": spec.backends,
                     "thresholds": {**recipe.thresholds, **spec.thresholds}})
    extra = {"recipe": {"name": recipe.name, "path": str(recipe.path), "sha256": st.key(recipe.text), "source": str(src),
                        "thresholds": recipe.thresholds, "artifacts": arts}}
    return Report(results=results, extra=extra)


def status_markdown(report: Report) -> str:
    rows = ["| artifact | type | status | size | build | validate | error |", "|---|---|---|---|---|---|---|"]
    for a in report.extra.get("recipe", {}).get("artifacts", []):
        size = "-" if not a.get("size_bytes") else f"{a['size_bytes'] / 2**20:.1f} MiB"
        fmt = lambda s: "-" if s is None else f"{s:.1f}s"  # noqa: E731
        rows.append(f"| {a['name']} | {a['type']} | {a['status']} | {size} | {fmt(a.get('build_s'))} | "
                    f"{fmt(a.get('validate_s'))} | {(a.get('error') or '').replace('|', '/')[:200]} |")
    return "\n".join(rows) + "\n"


def write_reports(report: Report, outdir: Path, json_path: str | None = None) -> None:
    report.write_json(outdir / REPORT_JSON)
    name = report.extra.get("recipe", {}).get("name", "recipe")
    md = f"# {name}\n\n## Artifacts\n\n{status_markdown(report)}\n## Validation\n\n{to_markdown(report)}"
    tmp = outdir / f".{REPORT_MD}.tmp"
    tmp.write_text(md)
    os.replace(tmp, outdir / REPORT_MD)
    if json_path:
        report.write_json(json_path)
