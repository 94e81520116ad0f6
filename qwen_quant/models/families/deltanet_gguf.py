"""The GGUF side of the Gated DeltaNet families (qwen3_next, qwen3_5, qwen3_5_moe): the tensor
transforms and hyper-parameter keys of llama.cpp's converter, as hooks for `GGUFNames`.

A port of ``convert_hf_to_gguf.py``'s ``Qwen3NextModel`` and ``_LinearAttentionVReorderBase`` /
``Qwen3_5TextModel`` (llama.cpp's ``conversion/qwen.py``). The converter is a script over the whole
llama.cpp tree, not a package, so the few lines that move tensors are restated here; the names they
end up under still come from gguf-py's tensor map, and the tests diff the result against the
converter's own output byte for byte. What llama.cpp's qwen3next / qwen35 graphs expect:

- ``A_log`` is stored as ``A = -exp(A_log)`` (``blk.N.ssm_a``); ``dt_bias`` is ``ssm_dt.bias``.
- ``conv1d.weight`` [channels, 1, kernel] loses its middle axis.
- Every RMSNorm but the gated one (``linear_attn.norm``) computes ``x * (1 + w)`` in transformers and
  ``x * w`` in llama.cpp, so ``1`` is added to the weight.
- Qwen3-Next's ``in_proj_qkvz`` interleaves q, k, v, z per key head; llama.cpp wants ``attn_qkv``
  (all q, all k, all v) and ``attn_gate`` (z) apart.
- Qwen3.5 keeps q, k, v and z in separate projections but, where value heads outnumber key heads,
  llama.cpp wants the value heads tiled (``[k0 k1 k0 k1 ...]``) rather than grouped by key head
  (``[k0 k0 k1 k1]``): every value-head axis is permuted (qkv's value rows, z, b, a, A, dt, conv1d's
  value channels, out_proj's columns). The permutation is the converter's, so ggml's broadcast of
  key heads over value heads reads the same pairs transformers' ``repeat_interleave`` makes.

The text GGUF carries no multi-token-prediction head: the files are ``convert_hf_to_gguf.py --no-mtp``'s.
"""

from __future__ import annotations

from typing import Iterator

#: Checkpoint prefixes outside the text model (the vision tower, the MTP head).
SKIP = ("model.visual.", "mtp.", "model.mtp.")
#: llama.cpp's qwen35 graph needs M-RoPE sections; the converter writes these when the config has none.
DEFAULT_MROPE_SECTION = [11, 11, 10, 0]


def _block(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdecimal()), None)


def _gguf_name(key: str, bid: int) -> str:
    import gguf

    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, key)].format(bid=bid) + ".weight"


def next_tensors(name: str, t, c: dict) -> Iterator[tuple[str, object]]:
    """``Qwen3NextModel.modify_tensors``."""
    import torch

    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "in_proj_qkvz.weight" not in name:
        yield name, t
        return
    hk, hv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    nk, nv, h = c["linear_num_key_heads"], c["linear_num_value_heads"], c["hidden_size"]
    split = [hk, hk, nv // nk * hv, nv // nk * hv]
    per_head = t.permute(1, 0).contiguous().view(-1, nk, sum(split))  # [hidden, key head, q+k+v+z]
    q, k, v, z = (p.contiguous().view(h, -1) for p in torch.split(per_head, split, dim=-1))
    bid = _block(name)
    yield _gguf_name("ATTN_QKV", bid), torch.cat([q, k, v], dim=-1).permute(1, 0).contiguous()
    yield _gguf_name("ATTN_GATE", bid), z.permute(1, 0).contiguous()


def _tile_v_heads(t, dim: int, nk: int, per_k: int, head_dim: int):
    """Value heads grouped by key head -> tiled over key heads, along ``dim``."""
    shape = list(t.shape)
    dim %= len(shape)
    t = t.reshape(*shape[:dim], nk, per_k, head_dim, *shape[dim + 1:])
    perm = list(range(t.dim()))
    perm[dim], perm[dim + 1] = perm[dim + 1], perm[dim]
    return t.permute(*perm).contiguous().reshape(*shape)


def qwen35_tensors(name: str, t, c: dict) -> Iterator[tuple[str, object]]:
    """``_LinearAttentionVReorderBase.modify_tensors``, then Qwen3-Next's."""
    import torch

    nk, nv = c.get("linear_num_key_heads", 0), c.get("linear_num_value_heads", 0)
    if nk > 0 and nv > 0 and nk != nv and "linear_attn." in name:
        hk, hv, per_k = c["linear_key_head_dim"], c["linear_value_head_dim"], nv // nk
        qk = 2 * hk * nk
        if ".in_proj_qkv." in name:
            t = torch.cat([t[:qk], _tile_v_heads(t[qk:], 0, nk, per_k, hv)], dim=0)
        elif ".in_proj_z." in name:
            t = _tile_v_heads(t, 0, nk, per_k, hv)
        elif ".in_proj_b." in name or ".in_proj_a." in name:
            t = _tile_v_heads(t, 0, nk, per_k, 1)
        elif ".A_log" in name or ".dt_bias" in name or ".dt_proj" in name:
            t = _tile_v_heads(t.unsqueeze(-1), 0, nk, per_k, 1).squeeze(-1) if t.dim() == 1 else \
                _tile_v_heads(t, -1, nk, per_k, 1)
        elif ".conv1d" in name:
            t = t.squeeze()
            t = torch.cat([t[:qk], _tile_v_heads(t[qk:], 0, nk, per_k, hv)], dim=0)
        elif ".out_proj." in name:
            t = _tile_v_heads(t, 1, nk, per_k, hv)
    yield from next_tensors(name, t, c)


def _rope(c: dict) -> dict:
    """The converter's ``rope_parameters`` (TextModel.__init__ mirrors the top-level keys into it)."""
    rope = dict(c.get("rope_parameters", c.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope and "partial_rotary_factor" not in rope:
        prf = next((c[k] for k in ("partial_rotary_factor", "rope_pct", "rope_percent") if k in c), None)
        if prf is not None:
            rope["partial_rotary_factor"] = prf
    return rope


def next_params(writer, c: dict) -> None:
    """``Qwen2MoeModel`` and ``Qwen3NextModel.set_gguf_parameters`` after TextModel's keys."""
    if (n := c.get("moe_intermediate_size")) is not None:
        writer.add_expert_feed_forward_length(n)
    if (n := c.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(n)
    writer.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(c["linear_key_head_dim"])
    writer.add_ssm_group_count(c["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(c["linear_num_value_heads"])
    writer.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
    if (types := c.get("layer_types")) is not None:  # gguf-py 0.19 on PyPI predates add_recurrent_layers
        writer.add_array(f"{writer.arch}.attention.recurrent_layers", [t == "linear_attention" for t in types])
    writer.add_full_attention_interval(c.get("full_attention_interval", 4))
    rope_dim = c.get("head_dim")
    if rope_dim is None:
        rope_dim = c["hidden_size"] // c["num_attention_heads"]
    writer.add_rope_dimension_count(int(rope_dim * _rope(c).get("partial_rotary_factor", 0.25)))


def qwen35_params(writer, c: dict) -> None:
    """Qwen3-Next's keys, then the M-RoPE sections llama.cpp's qwen35 loaders require.

    llama.cpp aborts at the first token when the sections (rotary pairs) add up to more than a head
    (``GGML_ASSERT(sect_dims <= ne0)``), so such a config is refused here in one line."""
    from qwen_quant.errors import QuantError

    rope = _rope(c)
    sections = rope.get("mrope_section") or DEFAULT_MROPE_SECTION
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if sum(sections) > head_dim:
        raise QuantError(f"mrope_section {list(sections)} adds up to {sum(sections)}, more than head_dim {head_dim}; "
                         "llama.cpp cannot run these M-RoPE sections (set rope_parameters.mrope_section to fit the head)")
    next_params(writer, c)
    if "mrope_section" not in rope:
        writer.add_rope_dimension_sections(DEFAULT_MROPE_SECTION)
