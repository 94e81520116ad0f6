"""Other libraries' noise off: their warnings, info logs and progress bars, so a command prints only ours.

What this covers, and why each is safe to drop for a user of these commands:

* transformers' ``Loading weights`` bars and its info/warning logs (``past_key_values`` deprecations,
  advisory notes): we load and call the models ourselves, and report what matters in our own words;
* ``FutureWarning``/``DeprecationWarning`` raised inside torch, transformers, onnx, onnxscript and
  torchvision (e.g. the ``past_key_values`` FutureWarning of ``Qwen2ForCausalLM.forward``);
* torchvision's ``Skipping ...`` warnings on import (it is imported by transformers, never used here);
* the ONNX exporter's opset notes and onnxscript's info logs.

Our own ``QuantError`` messages and progress (`qwen_quant.progress`) are untouched. Call
``silence_foreign()`` once, before those libraries are imported (the CLI does it first).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FOREIGN = r"(torch|torchvision|transformers|onnx|onnxscript|onnxruntime|accelerate|huggingface_hub|gguf)(\.|$)"


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def silence_foreign() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=FOREIGN)
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated")
    warnings.filterwarnings("ignore", message=r"(?i).*skipping")  # torchvision's import-time notes
    warnings.filterwarnings("ignore", message=r"(?i).*opset")
    for name in ("transformers", "torch.onnx", "onnxscript", "onnx_ir", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
        # torch resets its loggers' levels when it is imported; a filter on the logger stays
        if not any(isinstance(f, _BelowError) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_BelowError())
    for name in ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core"):
        if not any(isinstance(f, _BelowError) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_BelowError())  # "torchvision is not installed. Skipping ..."
    if "transformers" in sys.modules:  # already imported: its env vars were read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
