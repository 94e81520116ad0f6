"""The `qwen-quant` command line: thin typer commands that parse options and call one function each."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwen_quant.quiet import silence_foreign

silence_foreign()  # before torch/transformers/onnx load: their warnings and bars are not ours to show

app = typer.Typer(
    name="qwen-quant",
    help="Quantize Qwen checkpoints (GPTQ, AWQ, GGUF, ONNX) and validate every artifact against the full-precision model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export a checkpoint to another runtime's format (gguf, onnx).", no_args_is_help=True)
app.add_typer(export_app, name="export")


# Options shared by the quantizers (gptq, awq): one declaration each, the same names everywhere.
Calib = Annotated[str, typer.Option(help="Calibration text: shipped, a .txt/.jsonl/.parquet file, or hf:NAME[:CONFIG[:SPLIT]].")]
NSamples = Annotated[int, typer.Option(help="Calibration samples.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
Chat = Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Chat-formatted calibration samples (default: when the folder name says chat/instruct).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Pad = Annotated[bool, typer.Option(help="Pad the MLP intermediate size with zero units when the group size does not divide it (exact).")]
MoeCalibrate = Annotated[str, typer.Option("--moe-calibrate", help="Mixture-of-Experts statistics: routed (each expert from the tokens routed to it) or all (every token through every expert; the output still uses the routed ones).")]
MoeMinTokens = Annotated[int, typer.Option("--moe-min-tokens", help="An expert routed fewer calibration tokens is rounded to nearest instead (listed in qwen-quant-quantize.json).")]
Force = Annotated[bool, typer.Option(help="Replace an existing output folder.")]
Validate = Annotated[bool, typer.Option("--validate/--no-validate", help="Measure perplexity and parity against the original after writing.")]
Ctx = Annotated[int, typer.Option(help="Validation window length.")]
MaxTokens = Annotated[Optional[int], typer.Option(help="Validate on the first N evaluation tokens only.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here ('-' for stdout).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _emit(report, json_path: Optional[Path], title: str) -> None:
    from qwen_quant.report import emit

    emit(report, json_path, title)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Artifact to measure: checkpoint folder (full, GPTQ, AWQ, compressed-tensors), .gguf file, or ONNX folder/file."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Full-precision checkpoint to compare against (KL, top-1, greedy parity)."),
    backend: Optional[str] = typer.Option(None, help="torch, llama.cpp, onnxruntime or vllm (default: the artifact's natural runtime)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N, or cuda:0,1,... to split models too large for one GPU over several (torch)."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype: fp32, fp16, bf16 on torch (default fp32 on CPU, bf16 on CUDA) and vllm (default fp16 for GPTQ/AWQ, else bf16; fp32 for a full-precision model on CPU); llama.cpp and onnxruntime compute in the artifact's own types and ignore it."),
    streamed: Optional[bool] = typer.Option(None, "--streamed/--no-streamed", help="Score layer by layer (reference + artifact together), for models that do not fit the device; default: chosen by itself when they do not fit."),
    batch_size: int = typer.Option(0, help="Windows per forward (0: about 16k tokens on CUDA, 4k on the CPU)."),
    ctx: int = typer.Option(512, help="Window length in tokens."),
    method: str = typer.Option("windows", help="windows (llama-perplexity: non-overlapping, score 2nd half) or stride (HF sliding window)."),
    stride: Optional[int] = typer.Option(None, help="Stride for --method stride (default ctx/2)."),
    data: str = typer.Option("shipped", help="Evaluation text: shipped, a .txt/.jsonl/.parquet file, or hf:NAME[:CONFIG[:SPLIT]] from the local cache."),
    max_tokens: Optional[int] = typer.Option(None, help="Use only the first N tokens of the evaluation text."),
    greedy_tokens: int = typer.Option(32, help="Tokens decoded per prompt for greedy parity (0 to skip)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder (default: the reference's, else the artifact's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Perplexity of MODEL and, with --reference, its parity with the full-precision model.

    Example: qwen-quant eval ./Qwen2-1.5B-GPTQ-Int4 --reference ./Qwen2-1.5B --json report.json
    """
    from qwen_quant.progress import set_quiet
    from qwen_quant.report import Report
    from qwen_quant.validate import EvalConfig, run_eval

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    cfg = EvalConfig(ctx=ctx, method=method, stride=stride, data=data, max_tokens=max_tokens, greedy_tokens=greedy_tokens,
                     batch_size=batch_size)
    result = run_eval(model, cfg, reference=reference, backend=backend, device=device, dtype=dtype, tokenizer=tokenizer,
                      streamed=streamed)
    _emit(Report([result]), json_out, f"qwen-quant eval: {model}")


@app.command()
def info(
    model: str = typer.Argument(..., help="Checkpoint folder or cached hub id."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Family, sizes and quirks of a checkpoint.

    Example: qwen-quant info ./Qwen1.5-72B-Chat
    """
    import dataclasses
    import json

    from qwen_quant.models import check_model, model_info

    path, cfg, _ = check_model(model)
    mi = model_info(cfg, path)
    d = {**dataclasses.asdict(mi), "gqa": mi.gqa, "quirks": mi.quirks(), "path": str(path)}
    if (path / "conversion-report.json").is_file():  # converted from Qwen v1: its context limit is part of the model
        from qwen_quant.models.convert.v1_report import context_limit_line

        d["context_limit"] = context_limit_line(json.loads((path / "conversion-report.json").read_text()))
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{path}", show_header=False)
    for k, v in d.items():
        t.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
    Console().print(t)


@app.command()
def gptq(
    model: str = typer.Argument(..., help="Full-precision Qwen checkpoint folder (or cached hub id)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the quantized checkpoint."),
    bits: int = typer.Option(4, help="Weight bits: 2, 3, 4 or 8."),
    group_size: int = typer.Option(128, help="Columns per quantization group: 32, 64, 128 or -1 (per channel)."),
    desc_act: bool = typer.Option(False, "--desc-act/--no-desc-act", help="Act-order: quantize columns by decreasing Hessian diagonal (static groups)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid (zero point fixed at the middle) or asymmetric."),
    damp: float = typer.Option(0.01, help="Hessian dampening, fraction of its mean diagonal."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Recapture each linear group's inputs after the earlier groups are quantized (Qwen's releases), or capture all in one pass (faster)."),
    fmt: str = typer.Option("gptq", "--format", help="gptq (classic GPTQ, as Qwen's -GPTQ-Int4/Int8) or compressed-tensors (W4A16/W8A16 pack-quantized)."),
    calib: Calib = "shipped",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    chat: Chat = None,
    device: Device = "auto",
    pad: Pad = False,
    moe_calibrate: MoeCalibrate = "routed",
    moe_min_tokens: MoeMinTokens = 32,
    force: Force = False,
    validate: Validate = True,
    ctx: Ctx = 512,
    max_tokens: MaxTokens = None,
    rtn: bool = typer.Option(False, "--rtn", help="Round-to-nearest instead of GPTQ (a baseline), same grid and format."),
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """GPTQ weight-only quantization, layer by layer, then validation against the original.

    Example: qwen-quant gptq ./Qwen1.5-7B-Chat --bits 4 -o ./Qwen1.5-7B-Chat-GPTQ-Int4
    """
    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import GPTQConfig, RTNConfig, quantize_model
    from qwen_quant.validate import EvalConfig

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    common = dict(model=model, output=str(output), bits=bits, group_size=group_size, sym=sym, true_sequential=true_sequential,
                  format=fmt, calib=CalibConfig(calib, nsamples, seqlen, seed), chat=chat, device=device, pad=pad,
                  moe_calibrate=moe_calibrate, moe_min_tokens=moe_min_tokens, force=force, validate=validate, eval=EvalConfig(ctx=ctx, max_tokens=max_tokens))
    cfg = RTNConfig(**common) if rtn else GPTQConfig(**common, desc_act=desc_act, damp=damp)
    out, report = quantize_model(cfg)
    _print_quant_summary(report.extra["quantize"], out)
    _emit(report, json_out, f"qwen-quant gptq: {out}")


@app.command()
def awq(
    model: str = typer.Argument(..., help="Full-precision Qwen checkpoint folder (or cached hub id)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the quantized checkpoint."),
    bits: int = typer.Option(4, help="Weight bits: 4 (the AWQ GEMM format); 8 with --format compressed-tensors."),
    group_size: int = typer.Option(128, help="Columns per quantization group: 32, 64 or 128."),
    sym: bool = typer.Option(False, "--sym/--asym", help="Symmetric grid, or asymmetric with a zero point per group (AWQ's default); recipes' `sym`."),
    zero_point: Optional[bool] = typer.Option(None, "--zero-point/--no-zero-point", hidden=True, help="Old spelling of --asym/--sym."),
    clip: bool = typer.Option(True, "--clip/--no-clip", help="Search per-group clipping of the weight range (not for q/k)."),
    fmt: str = typer.Option("awq", "--format", help="awq (AutoAWQ GEMM, as Qwen's -AWQ releases) or compressed-tensors (W4A16 pack-quantized)."),
    calib: Calib = "shipped",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    chat: Chat = None,
    device: Device = "auto",
    pad: Pad = False,
    moe_calibrate: MoeCalibrate = "routed",
    moe_min_tokens: MoeMinTokens = 32,
    force: Force = False,
    validate: Validate = True,
    ctx: Ctx = 512,
    max_tokens: MaxTokens = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """AWQ weight-only quantization (activation-aware scales + clipping), layer by layer, then validation.

    Example: qwen-quant awq ./Qwen2-7B-Instruct --bits 4 --group-size 128 -o ./Qwen2-7B-Instruct-AWQ
    """
    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import AWQConfig, quantize_model
    from qwen_quant.validate import EvalConfig

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    cfg = AWQConfig(model=model, output=str(output), bits=bits, group_size=group_size, sym=sym if zero_point is None else not zero_point,
                      format=fmt, calib=CalibConfig(calib, nsamples, seqlen, seed), chat=chat, device=device, pad=pad,
                      moe_calibrate=moe_calibrate, moe_min_tokens=moe_min_tokens, force=force, validate=validate, eval=EvalConfig(ctx=ctx, max_tokens=max_tokens), clip=clip)
    out, report = quantize_model(cfg)
    _print_quant_summary(report.extra["quantize"], out)
    _emit(report, json_out, f"qwen-quant awq: {out}")


@app.command()
def fp8(
    model: str = typer.Argument(..., help="Full-precision Qwen checkpoint folder (or cached hub id)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the FP8 checkpoint."),
    fmt: str = typer.Option("fp8", "--format", help="fp8 (Qwen's -FP8 layout: quant_method fp8, weight_scale_inv per 128x128 block) or compressed-tensors (as llm-compressor writes)."),
    scheme: str = typer.Option("block", help="block (128x128 weight blocks, activations per token and 128 channels: FP8_BLOCK) or dynamic (per-channel weights, per-token activations: FP8_DYNAMIC; compressed-tensors only)."),
    device: Device = "auto",
    force: Force = False,
    validate: Validate = True,
    ctx: Ctx = 512,
    max_tokens: MaxTokens = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """FP8 e4m3 weights (no calibration), streamed layer by layer, then validation as the W8A8 kernel computes.

    Example: qwen-quant fp8 ./Qwen3-8B -o ./Qwen3-8B-FP8
    """
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8
    from qwen_quant.validate import EvalConfig

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    out, report = quantize_fp8(FP8Config(model=model, output=str(output), format=fmt, scheme=scheme, device=device,
                                         force=force, validate=validate, eval=EvalConfig(ctx=ctx, max_tokens=max_tokens)))
    _emit(report, json_out, f"qwen-quant fp8: {out}")


def _print_quant_summary(s: dict, out: Path) -> None:
    from qwen_quant.progress import log

    gb = 2**30
    peak = f", peak GPU {s['peak_gpu_bytes'] / gb:.2f} GiB" if s.get("peak_gpu_bytes") else ""
    log(f"[bold]{s['method']} int{s['bits']} g{s['group_size']}[/bold] -> {out}: "
        f"{s['size_before_bytes'] / 2**20:.1f} MiB -> {s['size_after_bytes'] / 2**20:.1f} MiB, {s['seconds']:.1f}s, "
        f"peak RSS {s['peak_rss_bytes'] / gb:.2f} GiB{peak}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("qwen-quant-demo"), "--workdir", "-w", help="Where artifacts and the report go."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run recipes/demo.yaml on the embedded default model: GPTQ, AWQ, GGUF and ONNX artifacts, each validated.

    The model is built and cached on first use; artifacts already built are reused on the next run.

    Example: qwen-quant demo --workdir /tmp/demo
    """
    from qwen_quant.demo import run_demo
    from qwen_quant.progress import set_quiet

    set_quiet(quiet)
    report = run_demo(workdir)
    _emit(report, json_out, "qwen-quant demo")
    failed = [a["name"] for a in report.extra.get("recipe", {}).get("artifacts", []) if a["status"] not in ("ok", "cached")]
    if failed:
        typer.echo(f"failed: {', '.join(failed)} (see {workdir / 'report.md'})", err=True)
        raise typer.Exit(1)


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for artifacts, state and report (default: ./<recipe name>-out)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the combined JSON report here."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated artifact names to run (others keep their last results)."),
    model: Optional[str] = typer.Option(None, "--model", help="Use this model instead of the recipe's source.model (folder, cached hub id or fixture:NAME)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny calibration and evaluation sizes: checks the pipeline, not the quality."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Build and validate every artifact of a recipe; skips what is already built from the same inputs.

    Writes OUT/report.json (common schema), OUT/report.md and OUT/recipe-state.json. Exit 1 when an
    artifact failed (the others still run), 2 on a bad recipe.

    Example: qwen-quant run recipes/qwen2-1.5b.yaml --model ./Qwen2-1.5B -o ./qwen2-1.5b-out
    """
    from qwen_quant.progress import set_quiet
    from qwen_quant.recipe import RunConfig, load_recipe, run_recipe
    from qwen_quant.report import print_table

    set_quiet(quiet)
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    outcome = run_recipe(load_recipe(recipe, model=model, smoke=smoke),
                         RunConfig(output=None if output is None else str(output), only=names,
                                   json=None if json_out is None else str(json_out)))
    print_table(outcome.report, title=f"qwen-quant run: {recipe}")
    typer.echo(f"report: {outcome.outdir / 'report.json'}, {outcome.outdir / 'report.md'}; "
               + ", ".join(f"{k}: {v}" for k, v in outcome.statuses.items()))
    if outcome.failed:
        typer.echo(f"failed: {', '.join(outcome.failed)} (see report.md)", err=True)
        raise typer.Exit(1)


@app.command()
def check(
    report: Path = typer.Argument(..., help="Report JSON written by `qwen-quant run` (or eval/gptq --json)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", "-b", help="Baseline report to compare with (same artifacts, same evaluation data)."),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="Allowed perplexity increase over the baseline, e.g. 1% (default 1% with --baseline)."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Largest allowed artifact/reference perplexity ratio."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Largest allowed mean KL divergence from the reference."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Smallest allowed top-1 agreement with the reference (0..1)."),
    max_kl_increase: Optional[str] = typer.Option(None, "--max-kl-increase", help="Allowed mean-KL growth over the baseline, e.g. 50% (the default)."),
    kl_floor: Optional[float] = typer.Option(None, "--kl-floor", help="KL growth below this absolute amount never fails (default 0.0002)."),
    max_top1_drop: Optional[float] = typer.Option(None, "--max-top1-drop", help="Allowed top-1 agreement drop below the baseline, in points (default 0.5)."),
    max_greedy_exact_drop: Optional[int] = typer.Option(None, "--max-greedy-exact-drop", help="Allowed drop in greedy prompts matching the reference exactly (default 1 on CPU backends, 2 elsewhere)."),
    max_greedy_prefix_drop: Optional[str] = typer.Option(None, "--max-greedy-prefix-drop", help="Allowed relative drop of the mean greedy matching prefix, e.g. 15% (the CPU default)."),
    match: Optional[list[str]] = typer.Option(None, "--match", help="NOW=BASE: compare the report's artifact NOW with the baseline's BASE (repeatable), when names differ."),
    allow: Optional[list[str]] = typer.Option(None, "--allow", help="Accept a failed metadata check by name, e.g. 'generation temperature' (repeatable)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write REPORT over the --baseline file instead of checking."),
) -> None:
    """CI gate: exit 1 if any artifact/backend regressed against the baseline or the limits, 0 otherwise.

    Limits come from the recipe (thresholds, carried in the report) unless given here, on top of
    defaults (docs/gate.md): with a baseline, perplexity +1%, mean KL +50% (growth under 0.0002 never
    fails) and top-1 -0.5 points; without one, absolute limits per artifact class. A failed metadata
    check (tokenizer, special ids, chat template, rope/eps/context) fails too. Exit 2 on unusable
    input: missing or invalid files, a baseline measured on other data, or nothing to check.

    Results are matched by artifact name, then by role (artifact type and backend); --match maps names.

    Example: qwen-quant check out/report.json --baseline ci/baseline.json --max-ppl-increase 1%
    """
    from qwen_quant.check import CheckConfig, run_check
    from qwen_quant.recipe.schema import parse_fraction

    limits = {k: v for k, v in (("max_ppl_ratio", max_ppl_ratio), ("max_kl", max_kl), ("min_top1", min_top1)) if v is not None}
    if max_ppl_increase is not None:
        limits["max_ppl_increase"] = parse_fraction(max_ppl_increase, "--max-ppl-increase")
    if max_kl_increase is not None:
        limits["max_kl_increase"] = parse_fraction(max_kl_increase, "--max-kl-increase")
    if kl_floor is not None:
        limits["kl_floor"] = kl_floor
    if max_top1_drop is not None:
        limits["max_top1_drop"] = max_top1_drop / 100  # points -> fraction
    if max_greedy_exact_drop is not None:
        limits["max_greedy_exact_drop"] = max_greedy_exact_drop
    if max_greedy_prefix_drop is not None:
        limits["max_greedy_prefix_drop"] = parse_fraction(max_greedy_prefix_drop, "--max-greedy-prefix-drop")
    pairs = {}
    for m in match or []:
        a, sep, b = m.partition("=")
        if not sep or not a or not b:
            from qwen_quant.errors import QuantError

            raise QuantError(f"--match {m}: write it as NOW=BASE (report artifact name = baseline artifact name)")
        pairs[a] = b
    code = run_check(CheckConfig(report=str(report), baseline=None if baseline is None else str(baseline),
                                 thresholds=limits, update_baseline=update_baseline, match=pairs, allow=list(allow or [])), echo=typer.echo)
    raise typer.Exit(code)


@app.command()
def convert(
    model: str = typer.Argument(..., help="Qwen v1 checkpoint folder (QWenLMHeadModel, qwen.tiktoken) or cached hub id like Qwen/Qwen-7B."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the qwen2 checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pytorch_model*.bin (pickle) weights when there are no safetensors."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the conversion report here ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Convert a Qwen v1 checkpoint (Qwen-7B/14B/72B) into a plain transformers qwen2 checkpoint.

    Example: qwen-quant convert ./Qwen-7B-Chat -o ./Qwen-7B-Chat-qwen2
    """
    import json

    from qwen_quant.models.convert.qwen_v1 import REPORT_FILE, ConvertConfig, convert_qwen_v1
    from qwen_quant.models.loader import resolve_model
    from qwen_quant.progress import log, set_quiet

    to_stdout = json_out is not None and str(json_out) == "-"
    set_quiet(quiet or to_stdout)
    out = convert_qwen_v1(ConvertConfig(model=resolve_model(model), output=output, force=force, allow_pickle=allow_pickle))
    report = json.loads((out / REPORT_FILE).read_text())
    if to_stdout:
        typer.echo(json.dumps({"output": str(out), **report}, indent=2, ensure_ascii=False))
        return
    if json_out is not None:
        json_out.write_text(json.dumps({"output": str(out), **report}, indent=2, ensure_ascii=False) + "\n")
    from qwen_quant.models.convert.v1_report import context_limit_line

    log(f"wrote {out} ({report['tensors_written']} tensors, {report['dtype']}); {context_limit_line(report)}")


@export_app.command("gguf")
def export_gguf_cmd(
    model: str = typer.Argument(..., help="qwen2 checkpoint folder (Qwen v1: run `qwen-quant convert` first)."),
    types: str = typer.Option("q4_k_m", "--type", "-t", help="Comma-separated GGUF types: q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k, f16, bf16, f32."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for <name>-<type>.gguf (default: <model>-gguf)."),
    outdir: Optional[Path] = typer.Option(None, "--outdir", hidden=True, help="Old spelling of --output."),
    outtype: str = typer.Option("f16", help="Float intermediate the quantized types are made from: f16, bf16 or f32."),
    imatrix: bool = typer.Option(False, "--imatrix/--no-imatrix", help="Weight the quantization error by an importance matrix from the calibration data."),
    calib: str = typer.Option("shipped", help="Calibration text for --imatrix: shipped, a .txt/.jsonl/.parquet file, or hf:NAME."),
    nsamples: int = typer.Option(64, help="Calibration windows for --imatrix."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Perplexity + parity of every file against MODEL on llama.cpp."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the validation report here ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Export MODEL to GGUF and quantize it with llama.cpp's own quantizer, one file per type.

    Example: qwen-quant export gguf ./Qwen2-1.5B --type q4_k_m,q5_k_m,q8_0 --imatrix -o ./gguf
    """
    from qwen_quant.export.gguf_export import GGUFExportConfig, export_gguf
    from qwen_quant.progress import set_quiet

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    output = output if output is not None else outdir
    export_gguf(GGUFExportConfig(model=model, types=types, outdir=None if output is None else str(output), outtype=outtype,
                                 imatrix=imatrix, calib=calib, nsamples=nsamples, seqlen=seqlen, force=force,
                                 validate=validate, json=None if json_out is None else str(json_out)))


@export_app.command("onnx")
def export_onnx_cmd(
    model: str = typer.Argument(..., help="qwen2 checkpoint folder (Qwen v1: run `qwen-quant convert` first)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: <model>-onnx[-fp16][-int4|-int8])."),
    fp16: bool = typer.Option(False, "--fp16", help="Export float16 weights and KV cache (default float32)."),
    int4: bool = typer.Option(False, "--int4", help="Weight-only int4 with onnxruntime's MatMulNBits (embedding too when ORT supports it)."),
    block_size: int = typer.Option(32, "--block-size", help="int4 block size along the input dimension: 16, 32, 64, 128."),
    sym: bool = typer.Option(True, "--sym/--asym", help="int4 symmetric (no zero points) or asymmetric."),
    int8: bool = typer.Option(False, "--int8", help="Dynamic int8 quantization of MatMul weights and the embedding (CPU)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Perplexity + parity against MODEL (or --reference) on onnxruntime."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Validate against this model (default for a GPTQ/AWQ checkpoint: the full-precision source it names, else the checkpoint itself)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the validation report here ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Export MODEL to ONNX with a KV cache (optimum / onnxruntime-genai layout), optionally int4 or int8.

    A GPTQ, AWQ or compressed-tensors W4A16 checkpoint is exported with its own 4-bit codes in MatMulNBits
    (no second quantization).

    Example: qwen-quant export onnx ./Qwen2-0.5B --int4 --block-size 32 -o ./qwen2-0.5b-onnx-int4
    Example: qwen-quant export onnx ./qwen2-0.5b-gptq --reference ./Qwen2-0.5B -o ./qwen2-0.5b-gptq-onnx
    """
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx
    from qwen_quant.progress import set_quiet

    set_quiet(quiet or (json_out is not None and str(json_out) == "-"))
    export_onnx(OnnxExportConfig(model=model, output=None if output is None else str(output), fp16=fp16, int4=int4,
                                 block_size=block_size, symmetric=sym, int8=int8, force=force, validate=validate,
                                 reference=reference, json=None if json_out is None else str(json_out)))


def main() -> None:  # console-script entry point
    from qwen_quant.errors import QuantError

    try:
        app()
    except QuantError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
