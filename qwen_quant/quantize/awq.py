"""AWQ (Lin et al., 2023) for one decoder layer: activation-aware scale search, clip search, then RTN.

Written here rather than taken from a package: AutoAWQ is archived and pins old transformers, and
llm-compressor's modifier is tied to its own pipeline. We follow AutoAWQ's ``AwqQuantizer``, which
is what produced Qwen's -AWQ releases:

1. Capture the inputs of every linear of the (still full-precision) layer over all calibration samples.
2. For each scalable pair (previous op -> linears sharing its output), try ``n_grid`` ratios ``a``
   in [0, 1): per input channel ``s = x_mean^a / (w_mean^(1-a) + 1e-4)`` ("duo scaling", AutoAWQ's
   default; ``x_mean^a`` alone with ``duo_scaling=False``), normalised by ``sqrt(max(s) min(s))``;
   replace the linears by ``Q(W s) / s`` and keep the ``s`` that minimises the MSE of the block's output
   (the attention output for q/k/v, the MLP output for gate/up, the linear's own output otherwise).
3. Fold ``1/s`` into the previous op (an RMSNorm weight, or the rows of the previous linear) and ``s``
   into the linears, so the float model is unchanged and only the quantization error moves.
4. Clip search (not for q/k, whose errors the q.k product amplifies): per (row, group), shrink the
   max |w| by up to 50% and keep the clip that minimises the group's output error on 512 tokens.
5. Round-to-nearest on the asymmetric grid (AutoAWQ's min/max formula; zero 0 is allowed here).

Scales are rounded to float16 before the codes are chosen, as AutoAWQ computes them in half
precision, so the checkpoint's fp16 ``scales`` reproduce `QuantResult.dequant()` exactly.
Unlike AutoAWQ, calibration activations for the next layer come from the quantized layer (the shared
driver in `run.py` does this for GPTQ and AWQ alike).

Kept fast on the GPU: whole inputs are kept only where a block is re-run (q/k/v and gate/up); for a
single-linear pair (v -> o with MHA, up -> down) the search uses the input's Gram matrix sum x x^T,
which gives the same output MSE without forwards or the [tokens, in] tensor (down_proj's input is
the largest of the layer); each candidate's loss stays on the device and the best ratio is taken
with one argmin; the clip search evaluates all shrink steps of a row batch in one batched matmul.
Mathematically the choices are those of the sequential searches (the tests compare them); float
rounding differs slightly (a linear's output error is no longer rounded to fp16 before squaring).
"""

from __future__ import annotations

import torch

from qwen_quant.errors import QuantError
from qwen_quant.quantize.config import AWQConfig
from qwen_quant.quantize.gptq import Hessian
from qwen_quant.quantize.grid import Grid, QuantResult, quantize_codes
from qwen_quant.models.family import ScalePair
from qwen_quant.quantize.layerwise import Layerwise, get_module


# The scalable pairs of each family (AutoAWQ's ``get_layers_for_scaling`` as data) live in the family
# files: `Family.scale_pairs`. v_proj -> o_proj only applies when the shapes match (MHA); with GQA
# o_proj has more in-features than v_proj has outputs.
NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ's avoid_clipping: the q.k product makes clipping error hard to see


# -- the grid -----------------------------------------------------------------------------------
def awq_params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [rows, groups] for ``w`` [rows, cols]: AutoAWQ's ``pseudo_quantize_tensor`` grid.

    Asymmetric: ``scale = (max - min) / maxq`` and ``zero = clamp(-round(min / scale), 0, maxq)``.
    Unlike AutoAWQ we widen [min, max] to include 0 first (as GPTQ does): for a group that does not
    straddle 0 AutoAWQ's clamped zero cuts off the top of the range; groups that straddle 0 (all
    real weight groups of 32+ values) are unaffected. Symmetric (``--no-zero-point``): ``scale = max|w| / (2^(b-1) - 1)``
    and the zero fixed at 2^(b-1), i.e. AutoAWQ's signed codes in [-2^(b-1), 2^(b-1) - 1].
    """
    rows, cols = w.shape
    g = w.float().reshape(rows, grid.groups(cols), grid.size(cols))
    if grid.sym:
        half = 2 ** (grid.bits - 1)
        scale = (g.abs().amax(-1).clamp(min=1e-5) / (half - 1)).half().float()
        return scale, torch.full_like(scale, half)
    mx, mn = g.amax(-1).clamp(min=0), g.amin(-1).clamp(max=0)
    scale = ((mx - mn).clamp(min=1e-5) / grid.maxq).half().float()
    zero = torch.clamp(-torch.round(mn / scale), 0, grid.maxq)
    return scale, zero


def awq_rtn(w: torch.Tensor, grid: Grid) -> QuantResult:
    rows, cols = w.shape
    scale, zero = awq_params(w, grid)
    gs = grid.size(cols)
    codes = quantize_codes(w.float().reshape(rows, -1, gs), scale[..., None], zero[..., None], grid.maxq)
    g_idx = torch.arange(cols, dtype=torch.int32, device=w.device) // gs
    return QuantResult(codes.reshape(rows, cols).int(), scale, zero.int(), g_idx, grid)  # stays on the device


def pseudo_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``w`` rounded to the grid and back, in float32 (what the searches measure)."""
    rows, cols = w.shape
    scale, zero = awq_params(w, grid)
    g = w.float().reshape(rows, -1, grid.size(cols))
    q = quantize_codes(g, scale[..., None], zero[..., None], grid.maxq)
    return ((q - zero[..., None]) * scale[..., None]).reshape(rows, cols)


# -- running blocks -----------------------------------------------------------------------------
@torch.no_grad()
def _run(lw: Layerwise, block: torch.nn.Module, x, attention: bool) -> list[torch.Tensor]:
    """The block's output per batch of ``x`` (a tensor, or the list of batches as captured), kept as a
    list: nothing [samples, seq, hidden]-sized is concatenated."""
    outs = []
    for xb in (x.split(lw.batch_size) if torch.is_tensor(x) else x):
        out = block(xb, position_embeddings=lw.pos_emb, attention_mask=None) if attention else block(xb)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _sq_err(ref: list[torch.Tensor], out: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences in float32, as a device scalar (no host sync)."""
    return sum((a.float() - b.float()).pow(2).sum() for a, b in zip(ref, out))


# -- scale search -------------------------------------------------------------------------------
@torch.no_grad()
def search_scale(lw: Layerwise, layer: torch.nn.Module, pair: ScalePair, x, grid: Grid,
                 n_grid: int = 20, duo_scaling: bool = True, gram: torch.Tensor | None = None,
                 x_mean: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
    """The per-input-channel scales [in] for ``pair`` that minimise its block's output MSE.

    A block (attention, MLP) is run on every sample for every ratio. A single linear needs no
    forwards: with ``gram`` = sum x x^T over its ``tokens`` inputs, the summed squared output error
    of weights W' is sum((W - W') G (W - W')^T), exactly the same quantity (up to float rounding)
    at out x in^2 instead of tokens x in x out work, and without keeping the inputs.
    The loss of every ratio stays on the device; the best is picked once at the end.
    """
    lins = [get_module(layer, n) for n in pair.linears]
    block = get_module(layer, pair.inspect) if pair.inspect else lins[0]
    orig = [lin.weight.data.clone() for lin in lins]
    w = torch.cat([o.float() for o in orig])
    gs = grid.size(w.shape[1])
    wg = w.abs().reshape(w.shape[0], -1, gs)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    if x_mean is None and torch.is_tensor(x):
        x_mean = x.abs().float().reshape(-1, x.shape[-1]).mean(0)
    elif x_mean is None:  # the captured batches
        x_mean = sum(xb.abs().float().reshape(-1, xb.shape[-1]).sum(0) for xb in x) / sum(
            xb[..., 0].numel() for xb in x)
    use_gram = gram is not None and pair.inspect is None
    if use_gram:
        n_out = orig[0].shape[0] * tokens
    else:
        ref = _run(lw, block, x, pair.attention)
        n_out = sum(r.numel() for r in ref)

    cands, losses = [], []
    try:
        for r in range(n_grid):
            a = r / n_grid
            if duo_scaling:
                s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            else:
                s = x_mean.pow(a).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, 1.0)
            cands.append(s)
            if use_gram:
                D = orig[0].float() - (pseudo_quantize(orig[0].float() * s, grid) / s).to(orig[0].dtype).float()
                losses.append((D * (D @ gram)).sum() / n_out)
                continue
            for lin, o in zip(lins, orig):
                lin.weight.data = (pseudo_quantize(o.float() * s, grid) / s).to(o.dtype)
            losses.append(_sq_err(ref, _run(lw, block, x, pair.attention)) / n_out)
    finally:
        for lin, o in zip(lins, orig):
            lin.weight.data = o
    loss = torch.stack(losses)
    loss = torch.where(torch.isnan(loss), float("inf"), loss)  # NaN never wins, as with `err < best`
    best = int(torch.argmin(loss))  # the first minimum, as the sequential search kept it
    if not bool(torch.isfinite(loss[best])):
        raise QuantError(f"AWQ scale search for {pair.linears} produced no finite loss; "
                         "the layer's activations contain inf/nan (try float32, --device cpu, to check the model)")
    return cands[best]


@torch.no_grad()
def apply_scale(layer: torch.nn.Module, pair: ScalePair, s: torch.Tensor, offset: float = 0.0) -> None:
    """Fold ``1/s`` into the previous op and ``s`` into the linears: the float function is unchanged.

    ``offset``: the family's ``norm_offset`` (an RMSNorm computing ``x * (offset + w)`` gets
    ``w' = (offset + w) / s - offset``)."""
    prev = get_module(layer, pair.prev)
    sd = s.to(prev.weight.device)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.data[-s.numel():] = (prev.weight.data[-s.numel():].float() / sd[:, None]).to(prev.weight.dtype)
    else:  # RMSNorm: y = (offset + w) * norm(x)
        prev.weight.data = ((offset + prev.weight.data.float()) / sd - offset).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data[-s.numel():] = (prev.bias.data[-s.numel():].float() / sd).to(prev.bias.dtype)
    for n in pair.linears + pair.also:
        lin = get_module(layer, n)
        lin.weight.data = (lin.weight.data.float() * sd).to(lin.weight.dtype)


# -- clip search --------------------------------------------------------------------------------
@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5,
                rows_per_batch: int | None = None) -> torch.Tensor:
    """Per (row, group) clip value max|w| * (1 - i/n_grid) that minimises the group's output MSE.

    ``x`` [tokens, in] is the (already scaled) input sample. Returns [rows, groups].
    Each group's output is a batched matmul over groups, so nothing [rows, tokens, in]-sized is built;
    every shrink step of a row batch is evaluated in one batched matmul, and the first minimum is
    kept with argmin (what the sequential ``err < best`` loop kept), without a host round trip.
    """
    rows, cols = w.shape
    gs = grid.size(cols)
    steps = int(max_shrink * n_grid)
    xg = x.float().reshape(x.shape[0], -1, gs).transpose(0, 1)  # [G, T, gs]
    G, T = xg.shape[0], xg.shape[1]
    if rows_per_batch is None:  # ~256 MiB of float32 candidate outputs per batch
        rows_per_batch = max(64, min(rows, (2**26) // max(1, steps * G * T)))
    shrink = torch.tensor([1 - i / n_grid for i in range(steps)], device=w.device)  # [S], as Python floats
    best_all = []
    for r0 in range(0, rows, rows_per_batch):
        wb = w[r0:r0 + rows_per_batch].float()
        R = wb.shape[0]
        wg = wb.reshape(R, -1, gs)  # [R, G, gs]
        org_max = wg.abs().amax(-1)  # [R, G]
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, T, R]
        mx = org_max[None] * shrink[:, None, None]  # [S, R, G]
        cw = torch.maximum(torch.minimum(wg[None], mx[..., None]), -mx[..., None])  # [S, R, G, gs]
        qw = pseudo_quantize(cw.reshape(steps * R, cols), grid).reshape(steps, R, G, gs)
        out = torch.matmul(xg[None], qw.permute(0, 2, 3, 1))  # [S, G, T, R]
        err = (out - org_out[None]).pow(2).mean(2).transpose(1, 2)  # [S, R, G]
        del out, qw, cw
        err = torch.where(torch.isnan(err), float("inf"), err)
        pick = torch.argmin(err, 0)  # [R, G]: the first shrink step with the least error
        best_all.append(torch.gather(mx, 0, pick[None]).squeeze(0))
    return torch.cat(best_all)


def apply_clip(lin: torch.nn.Linear, max_val: torch.Tensor, grid: Grid) -> None:
    w = lin.weight.data
    wg = w.float().reshape(w.shape[0], -1, grid.size(w.shape[1]))
    mx = max_val.to(w.device)[..., None]
    lin.weight.data = torch.maximum(torch.minimum(wg, mx), -mx).reshape(w.shape).to(w.dtype)


# -- one layer ----------------------------------------------------------------------------------
def _expand(lw: Layerwise, p: ScalePair) -> list[ScalePair]:
    """Real-name pairs of template pair ``p`` in the current layer: one per expert where ``prev`` is an
    expert's linear, the experts' linears listed where only ``linears`` name them, none where the
    layer lacks the modules (the dense MLP of a sparse layer, the experts of a dense one)."""
    from dataclasses import replace

    fam, cfg, i = lw.family, lw.config, lw.layer_index
    prevs = fam.expand(p.prev, cfg, i)
    if "#" in p.prev:
        per = [fam.expand(n, cfg, i) for n in p.linears]
        return [replace(p, prev=pv, linears=tuple(ls)) for pv, *ls in zip(prevs, *per)]
    linears = tuple(n for t in p.linears for n in fam.expand(t, cfg, i))
    return [replace(p, linears=linears)] if prevs and linears else []


def _pairs(lw: Layerwise, layer: torch.nn.Module) -> list[ScalePair]:
    pairs = []
    for p in (q for t in lw.family.scale_pairs for q in _expand(lw, t)):
        prev = get_module(layer, p.prev)
        first = get_module(layer, p.linears[0])
        if isinstance(prev, torch.nn.Linear) and prev.out_features != first.in_features:
            continue  # GQA: v_proj's outputs are repeated across heads before o_proj
        pairs.append(p)
    return pairs


@torch.no_grad()
def quantize_layer(lw: Layerwise, layer: torch.nn.Module, hidden: torch.Tensor, cfg: AWQConfig,
                   grid: Grid) -> dict[str, QuantResult]:
    """AWQ for one decoder layer: scales, clip, RTN, in place."""
    opts = {"clip": cfg.clip, "duo_scaling": cfg.duo_scaling, "n_grid": cfg.n_grid, "max_shrink": cfg.max_shrink,
            "clip_tokens": cfg.clip_tokens}
    if not lw.family.scale_pairs:
        raise QuantError(f"AWQ has no scaling table for the {lw.family.name} family; use gptq for it")
    groups = lw.family.layer_groups(lw.config, lw.layer_index)
    names = [n for g in groups for n in g]
    source = {n: g[0] for g in groups for n in g}  # linears of one group share one input tensor
    pairs = _pairs(lw, layer)
    pair_src = {}  # the captured input each pair's search reads
    for pair in pairs:
        src = source[pair.linears[0]]
        group_srcs = {source[n] for n in pair.linears}
        if len(group_srcs) > 1 and pair.inspect:
            # MoE: experts (and the shared expert) read routed parts of one normed input; the scale
            # is searched on that input, the block's input, and shared by all of them
            src = pair.inspect
        elif len(group_srcs) > 1:
            raise QuantError(f"AWQ scale pair {pair.linears} spans several inputs but names no block to inspect")
        if {n for n in names if source[n] in group_srcs} != set(pair.linears):
            raise QuantError(f"AWQ scale pair {pair.linears} must cover exactly the linears of its input")
        pair_src[pair] = (src, group_srcs)
    # what each input is needed for: whole tensors only where a block (attention, MLP) is re-run;
    # a single linear's pair needs its Gram matrix and mean |x|; clipping and the error need a sample
    full = {pair_src[p][0] for p in pairs if p.inspect}
    gram_src = {pair_src[p][0] for p in pairs if not p.inspect}
    lin_srcs = [g[0] for g in groups]
    srcs = lin_srcs + sorted(full - set(lin_srcs))
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in full}
    grams = {n: Hessian(get_module(layer, n).in_features, lw.device) for n in gram_src}
    abs_sum = {n: 0 for n in gram_src}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in lin_srcs}
    offset = dict.fromkeys(lin_srcs, 0)
    step = max(1, hidden.shape[0] * hidden.shape[1] // opts["clip_tokens"])  # AutoAWQ's n_sample_token

    def keep(n: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if n in feats:
            feats[n].append(x)
        if n in grams:
            grams[n].add(flat)
            abs_sum[n] = abs_sum[n] + flat.abs().float().sum(0)
        if n in samples:
            samples[n].append(flat[(-offset[n]) % step::step].clone())  # every step-th token of the stream
            offset[n] += flat.shape[0]

    lw.capture(layer, srcs, keep, hidden)
    inputs = feats  # lists of captured batches (a concatenated copy would double their memory)
    sample = {n: torch.cat(v) if v else torch.zeros(0, get_module(layer, n).in_features, device=lw.device, dtype=lw.dtype)
              for n, v in samples.items()}  # an expert no token was routed to has an empty sample
    del samples

    for pair in pairs:
        src, group_srcs = pair_src[pair]
        if src in grams:
            if not grams[src].n:  # an expert no calibration token reached: nothing to weigh, no scale
                continue
            s = search_scale(lw, layer, pair, None, grid, opts["n_grid"], opts["duo_scaling"], gram=grams[src].S,
                             x_mean=abs_sum[src] / grams[src].n, tokens=grams[src].n)
            del grams[src]
        else:
            s = search_scale(lw, layer, pair, inputs.pop(src), grid, opts["n_grid"], opts["duo_scaling"])
        apply_scale(layer, pair, s, lw.family.norm_offset)
        for g in group_srcs:  # the scaled linears now see x / s (rounded to the activation dtype, as they would)
            x = sample[g]
            sample[g] = (x.float() / s.to(x.device)).to(x.dtype)
    del inputs, grams
    sample = {n: x.float() for n, x in sample.items()}

    results = {}
    for n in names:
        lin = get_module(layer, n)
        scaled = lin.weight.data.float().clone()
        x = sample[source[n]]
        if opts["clip"] and not n.endswith(NO_CLIP) and x.shape[0]:
            apply_clip(lin, search_clip(lin.weight.data, x, grid, opts["n_grid"], opts["max_shrink"]), grid)
        r = awq_rtn(lin.weight.data, grid)
        dq = r.dequant()
        r.error = float((x @ (scaled - dq).T).pow(2).sum() / (x @ scaled.T).pow(2).sum().clamp_min(1e-20))
        lin.weight.data = dq.to(lin.weight.dtype)
        results[n] = r
    return results


class AWQQuantizer:
    """What the layer-by-layer driver calls for an `AWQConfig`: the scale search needs the whole
    layer in full precision first, so AWQ takes the layer rather than one group at a time."""

    def __init__(self, cfg: AWQConfig, grid: Grid):
        self.cfg, self.grid = cfg, grid

    def quantize_layer(self, lw: Layerwise, layer: torch.nn.Module, hidden: torch.Tensor,
                       layer_index: int) -> dict[str, QuantResult]:
        return quantize_layer(lw, layer, hidden, self.cfg, self.grid)
