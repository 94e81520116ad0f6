"""HF Qwen checkpoint -> float GGUF (F32/F16/BF16), the intermediate every quantized GGUF starts from.

Built on gguf-py (``GGUFWriter``, ``MODEL_ARCH``, ``get_tensor_name_map``, ``SpecialVocab``,
``Metadata``) so names, enums and the binary layout come from llama.cpp itself; the family file
(`qwen_quant.models.families`) names the GGUF architecture and its pre-tokenizer hashes. The metadata is
written value for value as llama.cpp's ``convert_hf_to_gguf.py`` writes it for the Qwen text models
(``TextModel.set_gguf_parameters``, ``_set_vocab_gpt2``/``get_vocab_base``, ``Metadata.set_gguf_meta_model``);
``bench/compare_llamacpp_convert.py`` diffs the two. We re-implement rather than import that script
because it is not a package, pulls the whole llama.cpp tree, and is not on PyPI.

Mixture-of-Experts families: the checkpoint keeps one tensor per expert and projection; llama.cpp keeps
one 3-D tensor per projection and layer (``blk.N.ffn_{gate,up,down}_exps``, experts along the slowest
axis), so the writer stacks them in expert order once a layer's last expert tensor has been read, and
yields down, gate, up in the converter's order (``Qwen2MoeModel.modify_tensors``; transformers' fused
``gate_up_proj`` layout is split the same way). Router and shared-expert gate stay F32 at every
outtype, as the converter keeps ``FFN_GATE_INP``/``FFN_GATE_INP_SHEXP``.

Hybrid linear-attention families (qwen3_next, qwen3_5, qwen3_5_moe): the family file's
``GGUFNames.tensors`` hook moves each tensor as the converter's model class does (see
`qwen_quant.models.families.deltanet_gguf`), and ``GGUFNames.params`` adds its keys. The text model of a
multimodal checkpoint is read under its prefix (``model.language_model.`` -> ``model.``, as the converter
strips ``language_model.``) with the config's ``text_config`` laid over the top level, and the tensors the
family's ``skip`` names (vision tower, MTP head) are left out.

Tied embeddings (Qwen2-0.5B/1.5B) need nothing special: the checkpoint has no ``lm_head.weight``, so no
``output.weight`` is written and llama.cpp falls back to ``token_embd.weight`` for the output projection.
"""

from __future__ import annotations

import json
import os
import re
from hashlib import sha256
from pathlib import Path
from typing import Iterator

import gguf
import torch

from qwen_quant.errors import QuantError

#: --outtype name -> (GGML tensor type for 2-D weights, GGUF general.file_type)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

#: convert_hf_to_gguf.py's text for hashing a BPE pre-tokenizer (get_vocab_base_pre).
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501

_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def load_hparams(model_dir: Path) -> tuple[dict, object]:
    """config.json and family of a checkpoint the GGUF writer takes (the registry refuses Qwen v1: convert it first).

    A multimodal config's ``text_config`` is laid over its top level, as the converter's TextModel does."""
    from qwen_quant.models.loader import check_model

    _, hparams, family = check_model(model_dir)
    if family.gguf is None:
        raise QuantError(f"{model_dir}: " + (family.gguf_hint or f"the {family.name} family has no GGUF export here; use the "
                                             "HF checkpoint with vLLM or transformers instead"))
    if family.text_config_key and isinstance(hparams.get(family.text_config_key), dict):
        hparams = {**hparams, **hparams[family.text_config_key]}
    return hparams, family


def gguf_arch(family) -> "gguf.MODEL_ARCH":
    """The gguf-py architecture enum the family's file names."""
    return getattr(gguf.MODEL_ARCH, family.gguf.arch)


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the safetensors shards, in file order like convert_hf_to_gguf.py."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        parts = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        parts = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    if not parts:
        raise QuantError(f"{model_dir} has no model*.safetensors; save the model with safetensors")
    for part in parts:
        with safe_open(model_dir / part, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


#: Block tensors convert_hf_to_gguf.py keeps in F32 at every outtype (the MoE router and shared-expert gate,
#: the linear-attention conv1d filter).
_F32_BLOCK_TENSORS = tuple(gguf.TENSOR_NAMES[t].split(".", 2)[2] + ".weight"
                           for t in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
                                     gguf.MODEL_TENSOR.SSM_CONV1D))


def tensor_type(new_name: str, n_dims: int, outtype: str) -> gguf.GGMLQuantizationType:
    """convert_hf_to_gguf.py's rule: 1-D tensors, norms, routers and non-``.weight`` tensors stay F32."""
    if (n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight")
            or (new_name.startswith("blk.") and new_name.split(".", 2)[-1] in _F32_BLOCK_TENSORS)):
        return gguf.GGMLQuantizationType.F32
    return OUTTYPES[outtype][0]


def text_tensors(model_dir: Path, family) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_checkpoint` restricted to the text model, under the text model's names (float16/float32)."""
    skip = family.gguf.skip if family.gguf else ()
    for name, t in iter_checkpoint(model_dir):
        name = family.module_path(name)
        if skip and name.startswith(skip):
            continue
        if t.dtype not in (torch.float16, torch.float32):
            t = t.to(torch.float32)
        yield name, t


def stacked_tensors(model_dir: Path, family, hparams: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """`text_tensors` with each MoE layer's per-expert tensors stacked into one [experts, out, in]
    tensor per projection (see the module docstring); other families' tensors pass through."""
    moe = family.moe
    if moe is None:
        yield from text_tensors(model_dir, family)
        return
    n_experts = moe.num_experts(hparams)
    prefix = rf"({re.escape(family.module_path(family.layers_path))}\.(\d+)\.{re.escape(moe.experts)})"
    per_expert = re.compile(prefix + r"\.(\d+)\.(\w+)\.weight")
    fused = re.compile(prefix + r"\.(gate_up_proj|down_proj)(\.weight)?")
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in text_tensors(model_dir, family):
        if m := fused.fullmatch(name):
            if m[3] == "down_proj":
                yield f"{m[1]}.down_proj.weight", t
            else:
                n_ff = t.shape[-2] // 2
                yield f"{m[1]}.gate_proj.weight", t[..., :n_ff, :].contiguous()
                yield f"{m[1]}.up_proj.weight", t[..., n_ff:, :].contiguous()
            continue
        m = per_expert.fullmatch(name)
        if m is None:
            yield name, t
            continue
        layer = pending.setdefault(int(m[2]), {})
        layer[name] = t
        if len(layer) >= n_experts * 3:
            for proj in ("down_proj", "gate_proj", "up_proj"):
                try:
                    parts = [layer.pop(f"{m[1]}.{e}.{proj}.weight") for e in range(n_experts)]
                except KeyError as err:
                    raise QuantError(f"{model_dir}: expert tensor {err.args[0]} is missing; "
                                     f"the checkpoint does not hold {n_experts} experts per layer as config.json says") from None
                yield f"{m[1]}.{proj}.weight", torch.stack(parts, dim=0)
    left = sorted(k for layer in pending.values() for k in layer)
    if left:
        raise QuantError(f"{model_dir}: {len(left)} expert tensors (first {left[0]}) do not make up whole layers of "
                         f"{n_experts} experts; check {moe.num_experts_key} in config.json")


def check_layers(model_dir: Path, hparams: dict, family) -> None:
    """Refuse MoE layers without experts where llama.cpp's architecture has no room for them."""
    if family.moe is None or family.gguf.dense_layers:
        return
    dense = [i for i in range(hparams["num_hidden_layers"]) if not family.moe.sparse(hparams, i)]
    if dense:
        arch = gguf.MODEL_ARCH_NAMES[gguf_arch(family)]
        raise QuantError(f"{model_dir}: decoder layers {dense} have no experts (mlp_only_layers / decoder_sparse_step), "
                         f"and llama.cpp's {arch} architecture has experts in every layer; run this checkpoint with "
                         "transformers or vLLM (HF, GPTQ or AWQ) instead of GGUF")


def add_tensors(writer: gguf.GGUFWriter, model_dir: Path, n_layers: int, outtype: str, family,
                hparams: dict | None = None) -> None:
    name_map = gguf.get_tensor_name_map(gguf_arch(family), n_layers)
    hook = family.gguf.tensors or (lambda name, t, config: ((name, t),))
    for hf_name, hf_t in stacked_tensors(model_dir, family, hparams or {}):
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        for name, t in hook(hf_name, hf_t, hparams or {}):
            _add_tensor(writer, name_map, name, t, outtype, model_dir, family)


def _add_tensor(writer: gguf.GGUFWriter, name_map, name: str, t: torch.Tensor, outtype: str, model_dir: Path,
                family) -> None:
    new_name = name if name.startswith("blk.") else name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise QuantError(f"tensor {name} in {model_dir} has no GGUF name for {family.name}; "
                         f"is this a plain {family.architectures[0]} checkpoint?")
    if t.dtype not in (torch.float16, torch.float32):
        t = t.to(torch.float32)
    data = t.numpy()
    qtype = tensor_type(new_name, data.ndim, outtype)
    writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def add_metadata(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict, outtype: str, family=None) -> None:
    """general.*, the family's hyper-parameters and the file type, as convert_hf_to_gguf.py writes them."""
    writer.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(writer)

    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    if (n_ff := hparams.get("intermediate_size")) is not None:
        writer.add_feed_forward_length(n_ff)
    writer.add_head_count(hparams["num_attention_heads"])
    if (n_kv := hparams.get("num_key_value_heads")) is not None:
        writer.add_head_count_kv(n_kv)
    rope = hparams.get("rope_parameters", hparams.get("rope_scaling")) or {}
    if "rope_theta" not in rope and "rope_theta" in hparams:
        rope = {**rope, "rope_theta": hparams["rope_theta"]}
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            val = rope.get(key, rope.get("attn_factor")) if key == "attention_factor" else rope.get(key)
            if val is not None:
                add(val)
    if "mrope_section" in rope:  # padded to [time, height, width, extra]
        writer.add_rope_dimension_sections((list(rope["mrope_section"]) + [0, 0, 0, 0])[:4])
    if (theta := rope.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (eps := hparams.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if family is not None and family.moe is not None:
        if n := family.moe.num_experts(hparams):
            writer.add_expert_count(n)
        if (n := hparams.get(family.moe.top_k_key)) is not None:
            writer.add_expert_used_count(n)
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(OUTTYPES[outtype][1])
    if family is not None and family.gguf.params is not None:
        family.gguf.params(writer, hparams)  # e.g. the expert FFN widths of a MoE family
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocab_base(model_dir: Path, vocab_size: int, pre_names: dict[str, str]) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name, ported from convert_hf_to_gguf.py's get_vocab_base."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in pre_names:
        raise QuantError(f"{model_dir}: tokenizer is not the Qwen BPE tokenizer (pre-tokenizer hash {chkhsh[:12]}...); "
                         "use the tokenizer files that ship with the model")
    reverse = {i: t for t, i in tok.vocab.items()}
    if max(reverse) >= vocab_size:
        raise QuantError(f"{model_dir}: tokenizer has ids >= config vocab_size {vocab_size}; fix config.json")
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects control/user tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre_names[chkhsh]


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, family) -> None:
    """gpt2 BPE vocab, merges, special ids and chat template (``_set_vocab_gpt2``)."""
    tokens, types, pre = vocab_base(model_dir, vocab_size, family.gguf.pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)


def write_float_gguf(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Write ``model_dir`` as a float GGUF at ``out`` (temp file + rename, so ``out`` is complete or absent)."""
    if outtype not in OUTTYPES:
        raise QuantError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    hparams, family = load_hparams(model_dir)
    check_layers(model_dir, hparams, family)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf_arch(family)])
    add_tensors(writer, model_dir, hparams["num_hidden_layers"], outtype, family, hparams)
    add_metadata(writer, model_dir, hparams, outtype, family)
    add_vocab(writer, model_dir, hparams["vocab_size"], family)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
