"""Qwen v1 (remote-code ``QWenLMHeadModel``) -> a plain transformers ``Qwen2ForCausalLM`` checkpoint.

Why a conversion and not a second code path everywhere: v1 is the qwen2 architecture in other
clothes (verified against modeling_qwen.py): fused ``c_attn`` = [q; k; v] with bias, MHA, NeoX
rotary with base ``rotary_emb_base`` over the whole head, RMSNorm, SwiGLU with
``c_proj(w1(x) * silu(w2(x)))`` -- so gate_proj = w2, up_proj = w1 -- and an untied lm_head. Two
inference-time tricks have no qwen2 equivalent: dynamic NTK rope scaling and logN attention
scaling. Both switch on only when the context exceeds ``seq_length`` (ntk_alpha is 1 and the logN
factor is 1 up to there), so the converted model computes exactly what v1 computes for contexts of
at most ``seq_length`` tokens; conversion-report.json says so, and what v1 does past it
(v1_report.py: why transformers' rope options cannot express it, and the measured effect).

Launch-era folders (Qwen-7B/-Chat as first published, August 2023) spell the sizes ``n_embd``,
``n_head``, ``n_layer``, ``ffn_hidden_size``, ``n_positions``, ``padded_vocab_size``; they are
renamed to the later names first, so both give the same checkpoint (the report lists the renames).

Weights are copied bit for bit in their stored dtype, one source shard at a time, into output
shards of at most ``max_shard_bytes``; everything is written to a temp folder next to the output
and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qwen_quant.models.convert import tiktoken_tok
from qwen_quant.models.convert.v1_report import conversion_report
from qwen_quant.errors import QuantError
from qwen_quant.progress import progress

REPORT_FILE = "conversion-report.json"
_GEN_FIELDS = ("max_new_tokens", "do_sample", "top_k", "top_p", "temperature", "repetition_penalty")


@dataclass
class ConvertConfig:
    model: Path
    output: Path
    force: bool = False
    allow_pickle: bool = False
    max_shard_bytes: int = 5 * 1024**3


def is_qwen_v1(model_dir: Path) -> bool:
    """A v1 checkpoint folder: the registry's v1 family (model_type qwen, QWenLMHeadModel or qwen.tiktoken)."""
    from qwen_quant.models.registry import QWEN_V1, detect_family

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        config = json.loads(cfg_path.read_text())
        return detect_family(config, model_dir, allow_unsupported=True) is QWEN_V1
    except (QuantError, ValueError):
        return False


# The August 2023 launch of Qwen-7B/-Chat shipped a config.json with Megatron/GPT-2 spellings; the
# September 2023 re-release renamed them. Same meaning and values (its configuration_qwen.py mapped
# hidden_size -> n_embd etc. through attribute_map), so a launch-era folder converts to the same checkpoint.
LAUNCH_ERA_KEYS = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
                   "ffn_hidden_size": "intermediate_size", "n_positions": "max_position_embeddings",
                   "padded_vocab_size": "vocab_size"}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def normalize_config(cfg: dict, where: Path) -> tuple[dict, dict[str, str]]:
    """Launch-era key names -> the later ones; returns (config, {old: new} for the keys renamed)."""
    out, renamed = dict(cfg), {}
    for old, new in LAUNCH_ERA_KEYS.items():
        if old not in cfg:
            continue
        if new in cfg and cfg[new] != cfg[old]:
            raise QuantError(f"{where}/config.json has {old}={cfg[old]} and {new}={cfg[new]}, which disagree; keep the one that "
                             "matches the weights (the embedding's shape) and delete the other")
        out[new] = out.pop(old)
        renamed[old] = new
    for key in _REQUIRED:
        if not isinstance(out.get(key), int):
            old = next((o for o, n in LAUNCH_ERA_KEYS.items() if n == key), None)
            also = f" (or its launch-era name {old!r})" if old else ""
            raise QuantError(f"{where}/config.json has no integer {key!r}{also}; copy config.json from the original Qwen v1 release")
    return out, renamed


def seq_length(cfg: dict) -> int:
    """v1's ``seq_length``: the context it was trained for, where dynamic NTK and logN switch on."""
    return int(cfg.get("seq_length") or cfg.get("max_position_embeddings") or 8192)


def _check_source(model_dir: Path) -> tuple[dict, dict[str, str]]:
    """Refuse everything that is not a plain full-precision Qwen v1 LM we can map exactly."""
    if not model_dir.is_dir():
        raise QuantError(f"{model_dir} is not a folder; pass a Qwen v1 checkpoint folder (config.json, qwen.tiktoken, weights)")
    if not is_qwen_v1(model_dir):
        raise QuantError(f"{model_dir} is not a Qwen v1 (QWenLMHeadModel) checkpoint; `qwen-quant convert` only takes Qwen-7B/14B/72B-style "
                         "v1 folders, qwen2 checkpoints need no conversion")
    raw = json.loads((model_dir / "config.json").read_text())
    for key, what in (("visual", "Qwen-VL"), ("audio", "Qwen-Audio"), ("quantization_config", "an already quantized")):
        if key in raw:
            raise QuantError(f"{model_dir} is {what} checkpoint ({key!r} in config.json); convert the full-precision text-only Qwen v1 model instead")
    cfg, renamed = normalize_config(raw, model_dir)
    where = f"{model_dir}/config.json"
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("kv_channels", h // heads) * heads != h or h % heads:
        raise QuantError(f"kv_channels*num_attention_heads != hidden_size in {where}; qwen2 needs head_dim = hidden/heads")
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise QuantError(f"rotary_pct={cfg['rotary_pct']} in {where}: partial rotary has no qwen2 equivalent")
    for key, want, why in (("no_bias", True, "biases on c_proj and the MLP"), ("scale_attn_weights", True, "unscaled attention scores"),
                           ("apply_residual_connection_post_layernorm", False, "a residual taken after the norm"),
                           ("pos_emb", "rotary", "a position embedding other than rotary")):
        if key in cfg and cfg[key] != want:
            raise QuantError(f"{key}={cfg[key]!r} in {where} means {why}, which qwen2 cannot hold; only plain Qwen v1 models "
                             f"({key}={want!r}) can be converted")
    if cfg["intermediate_size"] % 2:
        raise QuantError(f"odd intermediate_size in {where}; v1 splits it in two halves (w1, w2)")
    if not (model_dir / tiktoken_tok.TIKTOKEN_FILE).is_file():
        raise QuantError(f"{model_dir} has no {tiktoken_tok.TIKTOKEN_FILE}; copy the tokenizer file of the original Qwen v1 release next to config.json")
    return cfg, renamed


def _weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(p for p in model_dir.glob("*.bin") if p.name.startswith("pytorch_model"))
    if bins and not allow_pickle:
        raise QuantError(f"{model_dir} has only pickle weights ({bins[0].name}); loading pickles can run code, so pass --allow-pickle "
                         "if you trust this checkpoint")
    if not bins:
        raise QuantError(f"{model_dir} has no *.safetensors or pytorch_model*.bin weights; pass a complete Qwen v1 checkpoint folder")
    return bins


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:  # only reached with --allow-pickle; weights_only still refuses arbitrary objects
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) pickle format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()


def map_tensor(name: str, t: torch.Tensor, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """One v1 tensor -> its qwen2 tensor(s). Raises for anything qwen2 cannot hold."""
    if name == "transformer.wte.weight":
        return [("model.embed_tokens.weight", t)]
    if name == "transformer.ln_f.weight":
        return [("model.norm.weight", t)]
    if name == "lm_head.weight":
        return [("lm_head.weight", t)]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
        pre, rest = f"model.layers.{parts[2]}.", ".".join(parts[3:])
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = parts[-1]
            if t.shape[0] != 3 * hidden:
                raise QuantError(f"{name} has shape {tuple(t.shape)}, expected first dim 3*hidden={3 * hidden}; the checkpoint does not match its config.json")
            q, k, v = t.split(hidden, dim=0)  # modeling_qwen: mixed_x_layer.split(hidden_size, dim=2) -> q, k, v
            return [(f"{pre}self_attn.{p}_proj.{kind}", x.contiguous()) for p, x in zip("qkv", (q, k, v))]
        simple = {
            "ln_1.weight": "input_layernorm.weight",
            "ln_2.weight": "post_attention_layernorm.weight",
            "attn.c_proj.weight": "self_attn.o_proj.weight",
            "mlp.w2.weight": "mlp.gate_proj.weight",  # silu(w2(x)): the gate
            "mlp.w1.weight": "mlp.up_proj.weight",
            "mlp.c_proj.weight": "mlp.down_proj.weight",
        }
        if rest in simple:
            return [(pre + simple[rest], t)]
        if rest.endswith("masked_bias") or rest.endswith("rotary_emb.inv_freq"):
            return []  # non-persistent buffers some old exports saved
    raise QuantError(f"unexpected tensor {name!r}: qwen2 has no place for it (biases on c_proj/MLP need no_bias=true); "
                     "only plain Qwen v1 language models can be converted")


def _qwen2_config(cfg: dict, dtype: torch.dtype, eod_id: int) -> dict:
    from transformers import Qwen2Config

    seq = seq_length(cfg)
    q2 = Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], hidden_act="silu", max_position_embeddings=seq,
        initializer_range=cfg.get("initializer_range", 0.02), rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_emb_base", 10000))},
        use_sliding_window=False, attention_dropout=0.0, bos_token_id=eod_id, eos_token_id=eod_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    q2.architectures = ["Qwen2ForCausalLM"]
    out = q2.to_dict()
    # Older readers (transformers 4.x, llama.cpp's convert script) look for these two spellings.
    out["rope_theta"] = q2.rope_parameters["rope_theta"]
    out["torch_dtype"] = out["dtype"]
    return out


def _generation_config(src: Path, specials: dict[str, int]) -> tuple[dict, bool, list[str]]:
    """Keep the sampling defaults; turn v1's chat_format/stop_words_ids into eos ids transformers understands."""
    gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").is_file() else {}
    chat = gen.get("chat_format") == "chatml"
    eod, im_start, im_end = (specials[t] for t in (tiktoken_tok.ENDOFTEXT, tiktoken_tok.IMSTART, tiktoken_tok.IMEND))
    out = {k: gen[k] for k in _GEN_FIELDS if k in gen}
    out.update(bos_token_id=eod, pad_token_id=eod, eos_token_id=[im_end, im_start, eod] if chat else eod)
    dropped = sorted(k for k in gen if k not in _GEN_FIELDS and k not in ("eos_token_id", "pad_token_id", "bos_token_id", "transformers_version"))
    return out, chat, dropped


def _write_weights(files: list[Path], tmp: Path, hidden: int, max_shard_bytes: int) -> tuple[torch.dtype, int]:
    """Stream source shards into output shards; returns (dtype, tensor count)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes, written, dtypes, seen = [0], [], set(), set()

    def flush() -> None:
        part = f"model-part{len(written):05d}.safetensors"
        save_file(shards[-1], str(tmp / part), metadata={"format": "pt"})
        written.append((part, list(shards[-1])))
        shards[-1], sizes[-1] = {}, 0

    with progress("converting weights", total=len(files), unit="shards") as advance:
        for path in files:
            for name, t in _read_tensors(path):
                for new, x in map_tensor(name, t, hidden):
                    if new in seen:
                        raise QuantError(f"tensor {new} appears twice in {path.parent}; remove duplicate weight files")
                    seen.add(new)
                    dtypes.add(x.dtype)
                    nbytes = x.numel() * x.element_size()
                    if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                        flush()
                    shards[-1][new] = x
                    sizes[-1] += nbytes
            advance(1, info=path.name)
        if shards[-1]:
            flush()
    if len(dtypes) != 1:
        raise QuantError(f"mixed weight dtypes {sorted(map(str, dtypes))} in the checkpoint; qwen-quant expects one dtype")
    _name_shards(tmp, written)
    return dtypes.pop(), len(seen)


def _name_shards(tmp: Path, written: list[tuple[str, list[str]]]) -> None:
    if len(written) == 1:
        os.replace(tmp / written[0][0], tmp / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (part, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp / part, tmp / final)
        total += (tmp / final).stat().st_size
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _expected_names(cfg: dict) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    per = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    per += [f"self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]
    return names | {f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in per}


def convert_qwen_v1(cfg: ConvertConfig) -> Path:
    """Convert ``cfg.model`` (Qwen v1) into a qwen2 checkpoint folder at ``cfg.output``; returns the output path."""
    src, out = Path(cfg.model), Path(cfg.output)
    v1, renamed = _check_source(src)
    if out.exists() and not cfg.force:
        raise QuantError(f"{out} already exists; pass --force to replace it or choose another -o")
    if out.resolve() == src.resolve():
        raise QuantError("the output folder is the input folder; choose another -o")
    files = _weight_files(src, cfg.allow_pickle)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ranks = tiktoken_tok.load_ranks(src / tiktoken_tok.TIKTOKEN_FILE)
        specials = tiktoken_tok.special_ids(ranks)
        if max(specials.values()) >= v1["vocab_size"]:
            raise QuantError(f"vocab_size {v1['vocab_size']} in config.json is smaller than the tokenizer's {max(specials.values()) + 1} ids")
        gen, chat, dropped = _generation_config(src, specials)
        dtype, n = _write_weights(files, tmp, v1["hidden_size"], cfg.max_shard_bytes)
        missing = _expected_names(v1) - _written_names(tmp)
        if missing:
            raise QuantError(f"{len(missing)} tensors missing from {src} (e.g. {sorted(missing)[0]}); the checkpoint is incomplete")
        seq = seq_length(v1)
        (tmp / "config.json").write_text(json.dumps(_qwen2_config(v1, dtype, specials[tiktoken_tok.ENDOFTEXT]), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok = tiktoken_tok.write_tokenizer(src, tmp, chat=chat, model_max_length=seq)
        for extra in sorted(src.glob("LICENSE*")) + sorted(src.glob("NOTICE*")):
            shutil.copy2(extra, tmp / extra.name)
        report = conversion_report(v1, seq, src, files, str(dtype).removeprefix("torch."), n, tok, chat, dropped, renamed)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _written_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            names.update(f.keys())
    return names
