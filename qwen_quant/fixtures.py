"""Build, train briefly and cache small Qwen2-architecture models with the real Qwen2 tokenizer.

Random weights make greedy parity meaningless (flat logits flip on any noise), so every fixture is
trained for a few hundred steps on the shipped calibration text (never on the held-out eval text).
Each shape mirrors a quirk of a real Qwen release at small width; real vocab sizes are kept.

Training cost is dominated by the 152k-token vocabulary, while the shipped text uses a few thousand
tokens. So a model is trained on a small vocabulary (the tokens of the training text plus one "sink"
row standing for all others, whose logit carries +log(number of unseen tokens): this is exactly the
full softmax under the constraint that unseen rows are equal), then expanded to the real vocabulary
with every unseen row set to the sink row. Unseen tokens thus get the low probability the full
softmax would have taught them, and training takes a minute instead of an hour.

Hard variants (``*-outliers``, ``*-fp16overflow``) are trained fixtures passed through the exact,
function-preserving outlier transform of `qwen_quant.faults.outliers`; they are cached the same way.

Run ``python -m qwen_quant.fixtures [NAME...]`` to build them ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_quant.models.families import qwen2_moe, qwen3, qwen3_moe
from qwen_quant.models.registry import QWEN2

TRAIN_VERSION = 2


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    mirrors: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied: bool
    vocab_size: int = 151936
    rope_theta: float = 1000000.0
    max_positions: int = 4096
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0
    model_type: str = QWEN2.model_types[0]  # any supported family's transformers model type
    extra: tuple[tuple[str, object], ...] = ()  # further config.json fields (head_dim, experts, ...)


FIXTURES: dict[str, FixtureSpec] = {s.name: s for s in (
    FixtureSpec("qwen2-tiny-tied", "Qwen2-0.5B/1.5B: tied embeddings, GQA, qkv bias", 256, 640, 2, 4, 2, True),
    FixtureSpec("qwen2-tiny-untied", "Qwen1.5-7B: untied lm_head, MHA, qkv bias", 128, 384, 2, 4, 4, False),
    FixtureSpec("qwen2-tiny-72b", "Qwen2-72B: GQA 8:1, intermediate 7x128 (odd group count, not a multiple of 1024), vocab 152064",
                128, 896, 2, 8, 1, False, vocab_size=152064),
    FixtureSpec("qwen3-tiny", "Qwen3-0.6B/1.7B: tied embeddings, GQA, no qkv bias, q/k RMSNorm, head_dim 64 != hidden/heads",
                128, 384, 2, 4, 2, True, model_type=qwen3.FAMILY.model_types[0], extra=(("head_dim", 64),)),
    FixtureSpec("qwen2-moe-tiny", "Qwen1.5-MoE-A2.7B: 4 routed experts top-2, a shared expert behind its sigmoid gate, "
                "layer 0 dense through mlp_only_layers, qkv bias, untied", 128, 384, 2, 4, 4, False,
                model_type=qwen2_moe.FAMILY.model_types[0],
                extra=(("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 128),
                       ("shared_expert_intermediate_size", 256), ("mlp_only_layers", [0]), ("decoder_sparse_step", 1),
                       ("norm_topk_prob", False))),
    FixtureSpec("qwen3-moe-tiny", "Qwen3-30B-A3B: 4 routed experts top-2, norm_topk_prob, no shared expert, GQA, "
                "q/k RMSNorm, head_dim 64 != hidden/heads, untied", 128, 384, 2, 4, 2, False,
                model_type=qwen3_moe.FAMILY.model_types[0],
                extra=(("head_dim", 64), ("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 128),
                       ("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", []))),
)}
DEFAULT_FIXTURE = "qwen2-tiny-tied"


@dataclass(frozen=True)
class DerivedSpec:
    """A trained fixture passed through the function-preserving transform of `outliers`."""

    name: str
    base: str
    mirrors: str
    outliers: "OutlierSpec"


def _derived() -> dict[str, DerivedSpec]:
    from qwen_quant.faults.outliers import OutlierSpec

    return {d.name: d for d in (
        DerivedSpec("qwen2-tiny-tied-outliers", "qwen2-tiny-tied",
                    "Qwen2-0.5B at int4: salient activation-outlier channels (x10..30) after every norm and in the MLP",
                    OutlierSpec()),
        DerivedSpec("qwen2-tiny-untied-outliers", "qwen2-tiny-untied",
                    "the MHA fixture with the same outlier channels (all four AWQ scale pairs apply)", OutlierSpec()),
        *(DerivedSpec(f"{base}-outliers", base, f"the {base} fixture with outlier channels after every norm (the one all "
                      "experts read included) and inside every MLP and expert", OutlierSpec())
          for base in ("qwen2-moe-tiny", "qwen3-moe-tiny")),
        *(DerivedSpec(f"qwen2-tiny-{kind}-fp16overflow", f"qwen2-tiny-{kind}",
                      "Qwen2 in fp16 under the chat template: one MLP unit passes 65504 on ChatML prompts "
                      "(intermediate + 128 zero units)", OutlierSpec(channels=0, mlp_channels=0, fp16_overflow=True))
          for kind in ("tied", "untied")),
    )}


DERIVED_NAMES = ("qwen2-tiny-tied-outliers", "qwen2-tiny-untied-outliers", "qwen2-tiny-tied-fp16overflow",
                 "qwen2-tiny-untied-fp16overflow", "qwen2-moe-tiny-outliers", "qwen3-moe-tiny-outliers")


def tokenizer_dir() -> Path:
    from qwen_quant.calib import default_tokenizer_dir

    return Path(default_tokenizer_dir())


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_QUANT_CACHE", Path.home() / ".cache" / "qwen-quant")) / "fixtures"


def _key(spec: FixtureSpec, texts: list[str]) -> str:
    d = asdict(spec)
    for k in ("model_type", "extra"):  # fields added later: a qwen2 spec keeps the key it always had
        if d[k] == FixtureSpec.__dataclass_fields__[k].default:
            del d[k]
    h = hashlib.sha256(json.dumps([d, TRAIN_VERSION]).encode())
    for t in texts:
        h.update(t.encode())
    h.update((tokenizer_dir() / "tokenizer.json").read_bytes())
    return h.hexdigest()[:12]


def fixture_path(name: str = DEFAULT_FIXTURE, quiet: bool = False) -> Path:
    """The cached folder of fixture ``name``, built (about a minute on 2 cores) if missing."""
    from qwen_quant.calib import training_texts
    from qwen_quant.errors import QuantError

    if name in DERIVED_NAMES:
        from qwen_quant.faults import outliers

        d = _derived()[name]
        base = fixture_path(d.base, quiet)
        key = hashlib.sha256(json.dumps([base.name, asdict(d), outliers.VERSION]).encode()).hexdigest()[:12]
        return _cached(cache_root() / f"{name}-{key}", lambda tmp: outliers.build(base, tmp, d.outliers, name))
    if name not in FIXTURES:
        raise QuantError(f"unknown fixture {name!r}; choose one of {', '.join([*FIXTURES, *DERIVED_NAMES])}")
    spec, texts = FIXTURES[name], training_texts()
    return _cached(cache_root() / f"{name}-{_key(spec, texts)}", lambda tmp: _build(spec, texts, tmp, quiet))


def _cached(out: Path, build) -> Path:
    """``out`` if built, else ``build(tmp)`` into a temporary folder renamed to ``out`` (atomic)."""
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _config(spec: FixtureSpec, vocab_size: int, eos: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        spec.model_type, vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions, rope_theta=spec.rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tied, bos_token_id=eos, eos_token_id=eos, use_sliding_window=False, **dict(spec.extra),
    )


def _build(spec: FixtureSpec, texts: list[str], out: Path, quiet: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qwen_quant.progress import progress

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for t in texts:
        stream += tok(t)["input_ids"] + [eos]
    data = torch.tensor(stream)
    active = torch.unique(data)
    n_active, n_unseen = len(active), spec.vocab_size - len(active)
    small_ids = torch.searchsorted(active, data)  # training stream in the small vocabulary

    # Train with vocabulary = active tokens + one "sink" row that stands for every unseen token:
    # its logit carries +log(n_unseen), which is exactly the full softmax if all unseen rows are equal.
    torch.manual_seed(spec.seed)
    small = AutoModelForCausalLM.from_config(_config(spec, n_active + 1, int(torch.searchsorted(active, torch.tensor(eos)))))
    offset = torch.zeros(n_active + 1)
    offset[-1] = float(torch.log(torch.tensor(float(n_unseen))))
    opt = torch.optim.AdamW(small.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    bsz, seq = 16, 64
    with progress(f"training fixture {spec.name}", total=spec.steps, unit="steps") as advance:
        for _ in range(spec.steps):
            starts = torch.randint(0, len(small_ids) - seq - 1, (bsz,), generator=gen)
            batch = torch.stack([small_ids[s:s + seq + 1] for s in starts])
            logits = small(input_ids=batch[:, :-1]).logits + offset
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_active + 1), batch[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            advance(info=f"loss {loss.item():.3f}")

    full = AutoModelForCausalLM.from_config(_config(spec, spec.vocab_size, eos))
    _expand(small, full, active)
    full.config.dtype = "float32"
    full.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    tmpl = tokenizer_dir() / "chat_template.jinja"
    if tmpl.exists() and not (out / "chat_template.jinja").exists():
        shutil.copy(tmpl, out / "chat_template.jinja")
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(str(out))
    info = {**asdict(spec), "final_loss": round(float(loss.detach()), 4), "active_tokens": n_active}
    (out / "fixture.json").write_text(json.dumps(info, indent=2))


def _expand(small, full, active) -> None:
    """Copy the small-vocabulary model into the full one; unseen tokens get the sink row (plus tiny noise)."""
    import torch

    sd_small, sd_full = small.state_dict(), full.state_dict()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in sd_full.items():
            s = sd_small[name]
            if t.shape == s.shape:
                t.copy_(s)
                continue
            unseen = torch.ones(t.shape[0], dtype=torch.bool)
            unseen[active] = False
            t[active] = s[:-1]
            t[unseen] = s[-1] + torch.randn(int(unseen.sum()), t.shape[1], generator=gen) * 1e-3 * s[-1].abs().mean()


def main(argv: list[str]) -> int:
    for name in argv or [*FIXTURES, *DERIVED_NAMES]:
        print(fixture_path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
