"""The outlier transform (qwen_quant/faults/outliers.py): the fp32 function is unchanged, the
activations get real-model outliers, and the fp16-overflow plant overflows fp16 on chat prompts only."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_quant.faults.outliers import FP16_MAX, OutlierSpec, add_outliers, channel_outlier_ratio, probe_prompts


def _fixture(name: str):
    from qwen_quant.progress import set_quiet
    from qwen_quant.fixtures import fixture_path

    set_quiet(True)
    return fixture_path(name)


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _ids(n=2, length=64):
    from transformers import AutoTokenizer

    from qwen_quant.calib import eval_tokens
    from qwen_quant.fixtures import tokenizer_dir

    ev = eval_tokens(AutoTokenizer.from_pretrained(str(tokenizer_dir())), max_tokens=n * length)
    return torch.tensor(ev[: n * length].reshape(n, length))


@pytest.fixture(scope="module")
def pair(untied_model):
    """The MHA fixture (hidden 128, the cheaper one) and its hard twin."""
    return _load(untied_model), _load(_fixture("qwen2-tiny-untied-outliers"))


def test_transformed_fixture_keeps_the_fp32_logits(pair):
    base, hard = pair
    ids = _ids()
    with torch.no_grad():
        a, b = base(ids).logits, hard(ids).logits
    assert (a - b).abs().max() < 1e-4, float((a - b).abs().max())
    # ... while the weights really changed
    name = "model.layers.0.input_layernorm.weight"
    assert not torch.allclose(base.state_dict()[name], hard.state_dict()[name])


def test_transformed_fixture_has_outlier_channels(pair):
    base, hard = pair
    ids = _ids()
    before, after = channel_outlier_ratio(base, ids), channel_outlier_ratio(hard, ids)
    normed = [k for k in before if not k.endswith("down_proj")]  # the norm outputs: no outliers before
    assert max(before[k] for k in normed) < 5, before
    assert min(after.values()) >= 10, after  # every quantized input now has channels tens of times the median
    assert all(after[k] >= 5 * before[k] for k in normed), (before, after)


def test_transform_is_seeded_and_exact_on_other_fixtures(untied_model):
    """Same spec, same model; another seed, other factors; the MHA fixture keeps its logits too."""
    ids = _ids(1, 48)
    base = _load(untied_model)
    with torch.no_grad():
        ref = base(ids).logits
    runs = []
    for seed in (0, 0, 1):
        m = _load(untied_model)
        runs.append(add_outliers(m, OutlierSpec(seed=seed)))
        with torch.no_grad():
            assert (m(ids).logits - ref).abs().max() < 1e-4
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert all(10 <= f <= 30 for r in runs[0]["channels"] for f in r["factors"])


# -- the planted fp16 overflow (the fp16 overflow check builds on this fixture) -------------------
@pytest.fixture(scope="module")
def overflow():
    path = _fixture("qwen2-tiny-untied-fp16overflow")
    return path, json.loads((path / "fixture.json").read_text())["outliers"]["fp16_overflow"]


def _mlp_peak(model, ids, layer):
    """Peak |x| over the planted layer's MLP intermediate (up_proj output and down_proj input)."""
    peaks = []
    mlp = model.model.layers[layer].mlp
    hooks = [mlp.up_proj.register_forward_hook(lambda m, a, o: peaks.append(o.float().abs().max())),
             mlp.down_proj.register_forward_pre_hook(lambda m, a: peaks.append(a[0].float().abs().max()))]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
    finally:
        for h in hooks:
            h.remove()
    return float(max(peaks)), logits


def test_fp16_overflow_on_chat_prompts_only(overflow, untied_model):
    from transformers import AutoTokenizer

    path, rec = overflow
    chat, plain = probe_prompts(AutoTokenizer.from_pretrained(str(path)))
    base, f32, f16 = _load(untied_model), _load(path), _load(path, torch.float16)
    layer = rec["layer"]
    for ids in chat[:3]:
        peak32, lg32 = _mlp_peak(f32, ids, layer)
        with torch.no_grad():
            ref = base(torch.tensor([ids])).logits
        assert (lg32 - ref).abs().max() < 1e-4  # fp32: same function as the clean fixture
        assert peak32 > FP16_MAX  # ... whose MLP intermediate no longer fits fp16
        peak16, lg16 = _mlp_peak(f16, ids, layer)
        assert not torch.isfinite(torch.tensor(peak16)) or peak16 > FP16_MAX
        assert not bool(torch.isfinite(lg16).all())  # the fp16 forward ends in inf/nan, as Qwen's "!!!!"
    if rec["plain_stays_below_fp16_max"]:
        for ids in plain[:3]:
            peak16, lg16 = _mlp_peak(f16, ids, layer)
            assert peak16 < FP16_MAX and bool(torch.isfinite(lg16).all())


def test_clean_fixture_fits_fp16_on_chat_prompts(untied_model):
    from transformers import AutoTokenizer

    chat, _ = probe_prompts(AutoTokenizer.from_pretrained(str(untied_model)))
    f16 = _load(untied_model, torch.float16)
    for ids in chat[:3]:
        peak, lg = _mlp_peak(f16, ids, len(f16.model.layers) - 1)
        assert peak < FP16_MAX / 10 and bool(torch.isfinite(lg).all())
