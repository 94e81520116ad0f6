"""Weight-only quantization of Qwen checkpoints (GPTQ, RTN, AWQ: one config dataclass each, one driver).

`quantize_model(cfg)` is what `qwen-quant gptq` (and `rtn`) call: check inputs, sample calibration
tokens, run the layer-by-layer driver, write the checkpoint atomically, then validate it.
"""

from __future__ import annotations

from qwen_quant.quantize.config import AWQConfig, GPTQConfig, QuantConfig, RTNConfig, config_for
from qwen_quant.quantize.run import quantize_model

__all__ = ["AWQConfig", "GPTQConfig", "QuantConfig", "RTNConfig", "config_for", "quantize_model"]
