"""Weight-only quantization of Qwen checkpoints (GPTQ, RTN; AWQ plugs into the same driver).

`quantize_model(cfg)` is what `qwen-quant gptq` (and `rtn`) call: check inputs, sample calibration
tokens, run the layer-by-layer driver, write the checkpoint atomically, then validate it.
"""

from __future__ import annotations

from qwen_quant.quantize.config import QuantConfig
from qwen_quant.quantize.run import quantize_model

__all__ = ["QuantConfig", "quantize_model"]
