"""bench/llamacpp_cuda.py: the parity check catches the Qwen2-on-CUDA failure; the CPU smoke runs end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("llamacpp_cuda_bench", ROOT / "bench" / "llamacpp_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _metrics(test_logits, ref_logits, targets, prefix_mean=32.0) -> dict:
    from qwen_quant.validate.metrics import Accumulator

    acc = Accumulator()
    acc.add(test_logits, targets, ref_logits)
    return {**acc.result(), "greedy_prefix_mean": prefix_mean}


def test_parity_check_passes_close_runtimes_and_fails_gggg_and_nan():
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 1000, generator=g) * 4
    targets = torch.randint(0, 1000, (64,), generator=g)
    close = ref + 0.01 * torch.randn(64, 1000, generator=g)  # what two healthy runtimes differ by
    assert bench.check_parity(_metrics(close, ref, targets)) == []

    gggg = torch.zeros(64, 1000)
    gggg[:, 38] = 30.0  # one token always wins: "GGGG"
    why = bench.check_parity(_metrics(gggg, ref, targets, prefix_mean=0.0))
    assert any("top-1" in w for w in why) and any("KL" in w for w in why) and any("greedy" in w for w in why)

    nan = ref.clone()
    nan[5] = float("nan")  # fp16 overflow -> inf -> NaN logits at some positions
    assert "non-finite" in bench.check_parity(_metrics(nan, ref, targets))[0]


def test_verdict_vs_exact_is_relative_to_the_cpu_rows_own_distance():
    bench = _bench()
    cpu = {"kl_mean": 0.005, "top1_agreement": 0.93, "perplexity": 10.0}
    assert bench.check_vs_exact({"kl_mean": 0.012, "top1_agreement": 0.90, "perplexity": 10.1}, cpu) == []
    why = bench.check_vs_exact({"kl_mean": 0.02, "top1_agreement": 0.85, "perplexity": 10.5}, cpu)
    assert len(why) == 2 and "3x the CPU row" in why[0] and "top-1 vs exact" in why[1]
    # a near-exact CPU row does not make healthy noise fail: the KL cap never drops below the floor
    assert bench.check_vs_exact({"kl_mean": 0.0008, "top1_agreement": 0.99, "perplexity": 10.0},
                                {"kl_mean": 1e-5, "top1_agreement": 1.0, "perplexity": 10.0}) == []
    assert "non-finite" in bench.check_vs_exact({"kl_mean": float("nan"), "top1_agreement": 0.9,
                                                 "perplexity": 10.0}, cpu)[0]


def test_garbage_wrapper_is_the_gggg_failure():
    bench = _bench()

    class Tiny:
        vocab_size = 100

    g = bench.Garbage(Tiny(), token=38)
    out = g.logits(np.zeros((2, 5), dtype=np.int64))
    assert out.shape == (2, 5, 100) and (out.argmax(-1) == 38).all()
    assert g.greedy_batch([[1, 2], [3]], 4) == [[38] * 4, [38] * 4]


def test_replay_scores_against_exact_without_running_the_runtime_again():
    """`evaluate` on a replayed row gives the metrics of the recorded run, and never calls the runtime."""
    from qwen_quant.validate import EvalConfig, evaluate

    bench = _bench()

    class Runtime:  # a deterministic stand-in for a llama.cpp row, counting its calls
        name, device, dtype, vocab_size, calls = "llama.cpp", "cpu", "q4_k_m", 50, 0

        def device_logits(self, ids, keep=None):
            self.calls += 1
            g = torch.Generator().manual_seed(int(np.asarray(ids).sum()))
            out = torch.randn(*np.asarray(ids).shape, self.vocab_size, generator=g)
            return out if keep is None else out[:, -keep:]

        def greedy(self, prompt, n):
            self.calls += 1
            return [int(x) % self.vocab_size for x in range(sum(prompt), sum(prompt) + n)]

        def greedy_batch(self, prompts, n):
            return [self.greedy(p, n) for p in prompts]

    class Exact(Runtime):
        name = "torch"

    tokens = np.arange(400) % 50
    cfg = EvalConfig(ctx=64, greedy_tokens=4)
    prompts = [[1, 2, 3], [4, 5]]
    rt = Runtime()
    timed = bench.Timed(rt)
    first = evaluate(timed, tokens, cfg, Exact(), prompts)
    n = rt.calls
    again = evaluate(bench.Replay(timed), tokens, cfg, Exact(), prompts)
    assert rt.calls == n  # replayed: the runtime was not asked again
    assert again["kl_mean"] == first["kl_mean"] and again["greedy_exact"] == first["greedy_exact"]


@pytest.mark.slow
def test_smoke_runs_and_injected_garbage_exits_1(tmp_path):
    """The eval half of the GPU bench on the CPU wheel: a tiny random GGUF, both rows, the report; then
    the same run with the CUDA row replaced by 'GGGG' output must fail (exit 1)."""
    bench = _bench()
    out = tmp_path / "smoke.json"
    assert bench.main(["smoke", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    rows = {r["extra"]["row"]: r for r in rep["results"]}
    assert set(rows) == {"cpu-as-test", "cpu"} and rep["extra"]["parity_ok"] is True
    assert rep["extra"]["verdict"] == "vs-exact"  # both rows scored against float32 on the dequantized weights
    vx = [r["extra"]["vs_exact"] for r in rows.values()]
    assert vx[0] == vx[1] and 0 < vx[0]["kl_mean"] < 0.01 and vx[0]["top1_agreement"] > 0.9
    assert rows["cpu-as-test"]["metrics"]["top1_agreement"] == 1.0
    assert rows["cpu"]["extra"]["prompt_tokens_per_s"] > 0
    assert bench.main(["smoke", "--inject-garbage", "--json", str(out)]) == 1
    bad = json.loads(out.read_text())["extra"]
    assert bad["parity_ok"] is False and any("KL vs exact" in w for w in bad["parity_failures"])
