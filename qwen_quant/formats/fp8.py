"""FP8 (e4m3) weights: Qwen's ``quant_method: fp8`` block layout and compressed-tensors FP8_BLOCK / FP8_DYNAMIC.

Qwen's FP8 releases (and transformers' fine-grained FP8 integration, `FineGrainedFP8Config`) store each
quantized linear as a ``float8_e4m3fn`` ``weight`` and a float32 ``weight_scale_inv`` with one scale per
128 x 128 block (dequantized weight = fp8 value x scale). A linear whose dimensions are not multiples of
128 gets a ceil(out/128) x ceil(in/128) scale grid, the last row/column of blocks being partial, as the
format allows. compressed-tensors names the same scale ``weight_scale``; its FP8_DYNAMIC scheme keeps one
scale per output channel ([out, 1]).

`W8A8Linear` is the CPU reference of what the serving kernels compute: activations are quantized at run
time to e4m3 per token and per group of 128 input channels (per token over the whole row for the
per-channel scheme), each with its own scale, then multiplied with the fp8 weight blocks. It is written
here rather than taken from transformers because transformers' FP8 linear needs the Triton kernel (CUDA)
and its CPU fallback only dequantizes the weights, which would miss the activation quantization.

Where it differs from a real kernel: the product of two e4m3 values is exact in float32, so the only
difference is accumulation. We dequantize both operands (fp8 x scale, in float32) and let one float32
GEMM sum all K products; the Triton block kernel (and ``torch._scaled_mm``) sums each 128-wide K block in
float32 and then adds the block partial sums times ``x_scale * w_scale``. Both are float32 sums of the
same exact products in a different order and with the scale applied before instead of after the block
sum: the difference is float32 rounding, relative ~1e-6 per output, far below the fp8 error (~1e-2).
The kernel may also round the dequantized output to bf16 (the model dtype); the reference keeps the
model's compute dtype.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(E4M3).max)  # 448
BLOCK = 128


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [out, in], float32 scale [ceil(out/block), ceil(in/block)]): one amax scale per block."""
    o, i = w.shape
    ro, ri = _ceil(o, block), _ceil(i, block)
    wf = w.detach().float()
    padded = torch.zeros(ro * block, ri * block, dtype=torch.float32, device=w.device)
    padded[:o, :i] = wf
    blocks = padded.view(ro, block, ri, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return q.view(ro * block, ri * block)[:o, :i].contiguous(), scale.contiguous()


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [out, in], float32 scale [out, 1]): one amax scale per output channel (FP8_DYNAMIC)."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX)
    return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int | None = BLOCK) -> torch.Tensor:
    """float32 weight from fp8 values and their block ([ro, ri]) or per-channel ([out, 1]) scales."""
    o, i = q.shape
    qf = q.float()
    if block is None:
        return qf * scale.float().reshape(o, 1)
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:o, :i]
    return qf * s


def quantize_activation(x: torch.Tensor, group: int | None = BLOCK) -> torch.Tensor:
    """x rounded through e4m3 as the kernel sees it: one scale per token and ``group`` channels
    (None: per token over the whole row), returned dequantized in float32."""
    xf = x.float()
    k = xf.shape[-1]
    g = k if group is None else group
    pad = _ceil(k, g) * g - k
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.unflatten(-1, (-1, g))
    scale = xg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    xq = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).float() * scale
    return xq.flatten(-2)[..., :k]


class W8A8Linear(torch.nn.Module):
    """A linear that computes as the FP8 serving kernel does (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block: int | None,
                 act_group: int | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        self.block, self.act_group, self.dtype = block, act_group, dtype
        self.activations = True  # False: weight-only dequantization (what transformers does on a CPU)
        self._dense = dequantize(weight, self.weight_scale_inv, block)  # float32, cached: CPU evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_activation(x, self.act_group) if self.activations else x.float()
        y = xq @ self._dense.to(x.device).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def scale_name(qc: dict) -> str:
    return "weight_scale_inv" if qc.get("quant_method") == "fp8" else "weight_scale"


def scheme_of(qc: dict) -> tuple[int | None, int | None]:
    """(weight block, activation group) of an FP8 quantization_config; None = per channel / per token."""
    if qc.get("quant_method") == "fp8":
        b = qc.get("weight_block_size") or [BLOCK, BLOCK]
        return int(b[0]), int(b[1])
    grp = next(iter((qc.get("config_groups") or {}).values()), {})
    w, a = grp.get("weights") or {}, grp.get("input_activations") or {}
    block = (w.get("block_structure") or [None])[0] if w.get("strategy") == "block" else None
    return block, (a.get("group_size") if a.get("strategy") == "group" else None)


def is_fp8(qc: dict | None) -> bool:
    """Whether a quantization_config describes FP8 e4m3 weights (ours, Qwen's or compressed-tensors')."""
    qc = qc or {}
    if qc.get("quant_method") == "fp8":
        return True
    if qc.get("quant_method") != "compressed-tensors":
        return False
    w = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
    return w.get("type") == "float" and int(w.get("num_bits") or 0) == 8


def fp8_config(ignore: list[str], block: int = BLOCK) -> dict:
    """Qwen's layout, as its FP8 releases write it."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [block, block], "modules_to_not_convert": ignore}


def ct_config(scheme: str, ignore: list[str]) -> dict:
    """compressed-tensors FP8_BLOCK (scheme "block") or FP8_DYNAMIC ("dynamic"), built by the library's
    own presets, in the float-quantized format llm-compressor writes."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset = {"block": "FP8_BLOCK", "dynamic": "FP8_DYNAMIC"}[scheme]
    cfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                             format="float-quantized", quantization_status="compressed", ignore=ignore)
    d = cfg.model_dump(mode="json")
    d["quant_method"] = "compressed-tensors"
    return d


def load_w8a8(model_dir, dtype: torch.dtype = torch.float32):
    """A transformers model with every FP8 linear replaced by `W8A8Linear` (the CPU reference)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_quant.formats.checkpoint import WeightStore
    from qwen_quant.models.registry import detect_family

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    qc = raw["quantization_config"]
    block, group = scheme_of(qc)
    sname = scale_name(qc)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    cfg.quantization_config = None
    del cfg.quantization_config
    store = WeightStore(model_dir)
    sd, fp8 = {}, {}
    for name in store.where:
        if name.endswith("." + sname):
            continue
        t = store.get(name)
        if t.dtype == E4M3:
            fp8[name[: -len(".weight")]] = t
        else:
            sd[name] = t.to(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    for base, q in fp8.items():
        parent, _, attr = base.rpartition(".")
        bias = sd.pop(f"{base}.bias", None)
        setattr(model.get_submodule(parent), attr,
                W8A8Linear(q, store.get(f"{base}.{sname}"), bias, block, group, dtype))
    model.load_state_dict(sd, strict=False, assign=True)
    fam = detect_family(raw)
    parent, _, attr = fam.rotary_path.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attr, type(getattr(owner, attr))(config=cfg))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
