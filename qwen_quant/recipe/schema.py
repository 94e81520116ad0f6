"""Recipe YAML -> the same config dataclasses the CLI fills, with errors that name the key and line.

A recipe is data (as in llm-compressor): which model, which calibration and evaluation data, and a
list of artifacts, each with the options of its exporter and the backends to validate it on::

    name: Qwen2-1.5B
    source: {model: ./Qwen2-1.5B, convert: false}      # convert: true for Qwen v1 checkpoints
    calibration: {source: shipped, nsamples: 128, seqlen: 512}   # CalibConfig fields
    evaluation: {ctx: 512, max_tokens: 65536}                   # EvalConfig fields
    thresholds: {max_ppl_increase: 1%, max_kl: 0.05}            # for `qwen-quant check`
    artifacts:
      - {name: gptq-int4, type: gptq, bits: 4, group_size: 128, backends: [torch]}   # QuantConfig fields
      - {name: gguf, type: gguf, types: [q4_k_m, q8_0]}                              # GGUFExportConfig fields
      - {name: onnx-int4, type: onnx, int4: true, block_size: 32}                   # OnnxExportConfig fields

Option keys are the dataclass field names, checked against the dataclass's type hints, so there is
no second set of option names to keep in step. Line numbers come from ``yaml.compose`` node marks.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwen_quant.calib import CalibConfig
from qwen_quant.errors import QuantError
from qwen_quant.export.gguf_export import GGUFExportConfig
from qwen_quant.export.onnx import OnnxExportConfig
from qwen_quant.quantize.config import AWQConfig, GPTQConfig, QuantConfig, RTNConfig
from qwen_quant.quantize.fp8 import FP8Config
from qwen_quant.validate import EvalConfig

FIXTURE_PREFIX = "fixture:"

# artifact type -> (config class, fixed fields, backends it can be validated on)
ARTIFACT_TYPES: dict[str, tuple[type, dict, tuple[str, ...]]] = {
    "gptq": (GPTQConfig, {}, ("torch", "vllm")),  # vllm: opt-in, scripts/setup-vllm.sh
    "rtn": (RTNConfig, {}, ("torch", "vllm")),
    "awq": (AWQConfig, {}, ("torch", "vllm")),
    "gguf": (GGUFExportConfig, {}, ("llama.cpp",)),
    "onnx": (OnnxExportConfig, {}, ("onnxruntime",)),
    "fp8": (FP8Config, {}, ("torch", "vllm")),  # FP8Config fields: format (fp8|compressed-tensors), scheme
}
# Fields the runner fills itself (paths, overwrite, validation): not recipe options.
RUNNER_FIELDS = {"model", "output", "outdir", "force", "validate", "json", "eval", "device", "method",
                 "eval_ctx", "eval_max_tokens"}
THRESHOLD_KEYS = ("max_ppl_increase", "max_ppl_ratio", "max_kl", "min_top1")
TOP_KEYS = {"name": str, "description": str, "source": dict, "calibration": dict, "evaluation": dict,
            "device": str, "thresholds": dict, "artifacts": list}
SOURCE_KEYS = {"model": str, "convert": bool, "allow_pickle": bool}
ENTRY_KEYS = {"name", "type", "backends", "thresholds", "calibration"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Source:
    model: str
    convert: bool = False  # Qwen v1: run `qwen-quant convert` first (a cached step)
    allow_pickle: bool = False


@dataclass
class ArtifactSpec:
    name: str
    type: str
    config: Any  # QuantConfig | GGUFExportConfig | OnnxExportConfig (model/output filled by the runner)
    backends: list[str]
    thresholds: dict[str, float] = field(default_factory=dict)
    line: int = 0


@dataclass
class Recipe:
    name: str
    path: Path
    source: Source
    calib: CalibConfig
    eval: EvalConfig
    artifacts: list[ArtifactSpec]
    device: str = "auto"
    chat: bool | None = None  # calibration.chat as written (None: the quantizer decides from the folder name)
    thresholds: dict[str, float] = field(default_factory=dict)
    description: str = ""
    text: str = ""  # the recipe file, hashed into the report

    def artifact(self, name: str) -> ArtifactSpec:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise QuantError(f"no artifact named {name!r} in {self.path}; it has {', '.join(a.name for a in self.artifacts)}")


class _Doc:
    """The parsed YAML plus the line of every key path, for error messages."""

    def __init__(self, text: str, where: str):
        self.where = where
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise QuantError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
        finally:
            loader.dispose()
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._mark(node, ())

    def _mark(self, node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                self.lines[path + (k.value,)] = k.start_mark.line + 1
                self._mark(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._mark(item, path + (i,))

    def error(self, path: tuple, msg: str) -> QuantError:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), 0)
        key = ".".join(str(p) for p in path) or "(top level)"
        return QuantError(f"{self.where}:{line}: {key}: {msg}")


def _type_ok(value, hint) -> bool:
    """isinstance against a dataclass field's type hint (unions, list[str], dict; int accepted for float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is Any or hint is object:
        return True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _fill(doc: _Doc, path: tuple, cls, values: dict, fixed: dict | None = None, skip: set = frozenset(), **base):
    """Build ``cls`` from ``values``, rejecting unknown keys and wrong types with their line."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name not in (fixed or {})]
    kwargs = dict(base)
    for key, value in values.items():
        if key not in allowed:
            raise doc.error(path + (key,), f"unknown option; {cls.__name__} takes {', '.join(sorted(allowed))}")
        if not _type_ok(value, hints[key]):
            raise doc.error(path + (key,), f"{value!r} is not a {_type_name(hints[key])}")
        kwargs[key] = value
    kwargs.update(fixed or {})
    return cls(**kwargs)


def parse_fraction(value, what: str = "value") -> float:
    """'1%' -> 0.01; a plain number is taken as is (a fraction for ppl increase, 0.01 = 1%)."""
    if isinstance(value, bool):
        raise QuantError(f"{what} {value!r} is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise QuantError(f"{what} {value!r} is not a number or a percentage like 1%") from None


def _thresholds(doc: _Doc, path: tuple, raw) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise doc.error(path, f"must be a mapping of {', '.join(THRESHOLD_KEYS)}")
    out = {}
    for k, v in raw.items():
        if k not in THRESHOLD_KEYS:
            raise doc.error(path + (k,), f"unknown threshold; use {', '.join(THRESHOLD_KEYS)}")
        try:
            out[k] = parse_fraction(v, k)
        except QuantError as err:
            raise doc.error(path + (k,), str(err)) from None
    return out


def _checked(doc: _Doc, path: tuple, fn):
    """Run a dataclass's own check(), re-raising its message with the recipe line."""
    try:
        return fn()
    except QuantError as err:
        raise doc.error(path, str(err)) from None


def _artifact(doc: _Doc, i: int, raw, recipe_calib: CalibConfig, chat: bool | None) -> ArtifactSpec:
    path = ("artifacts", i)
    if not isinstance(raw, dict):
        raise doc.error(path, "each artifact must be a mapping with name, type and its options")
    for key in ("name", "type"):
        if key not in raw:
            raise doc.error(path, f"missing required key {key!r}")
    name, kind = raw["name"], raw["type"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise doc.error(path + ("name",), f"{name!r} must be letters, digits, '.', '_' or '-' (it names the output folder)")
    if kind not in ARTIFACT_TYPES:
        raise doc.error(path + ("type",), f"unknown artifact type {kind!r}; use one of {', '.join(ARTIFACT_TYPES)}")
    cls, fixed, allowed_backends = ARTIFACT_TYPES[kind]
    backends = raw.get("backends", list(allowed_backends[:1]))
    if isinstance(backends, str):
        backends = [backends]
    if not isinstance(backends, list) or not backends:
        raise doc.error(path + ("backends",), f"must be a non-empty list from {', '.join(allowed_backends)}")
    for j, b in enumerate(backends):
        if b not in allowed_backends:
            raise doc.error(path + ("backends", j), f"a {kind} artifact cannot be validated on {b!r}; use {', '.join(allowed_backends)}")
    options = {k: v for k, v in raw.items() if k not in ENTRY_KEYS}
    opath = path
    if "calibration" in raw and not issubclass(cls, QuantConfig):
        raise doc.error(path + ("calibration",), f"only gptq/rtn/awq artifacts take their own calibration; {kind} uses its own keys")
    if issubclass(cls, QuantConfig):
        own = raw.get("calibration", {})
        if not isinstance(own, dict):
            raise doc.error(path + ("calibration",), "must be a mapping of CalibConfig fields")
        calib = _fill(doc, path + ("calibration",), CalibConfig, own, **{**dataclasses.asdict(recipe_calib), **own})
        base = {"model": "", "output": "", "calib": calib, "chat": own.get("chat", chat)}
        cfg = _fill(doc, opath, cls, options, fixed, RUNNER_FIELDS | {"calib"}, **base)
        _checked(doc, path, cfg.check)
    elif cls is GGUFExportConfig:
        base = {"model": "", "calib": recipe_calib.source, "nsamples": recipe_calib.nsamples, "seqlen": recipe_calib.seqlen}
        cfg = _fill(doc, opath, cls, options, fixed, RUNNER_FIELDS, **base)
        cfg.types = _checked(doc, path + ("types",), cfg.check)
    else:
        cfg = _fill(doc, opath, cls, options, fixed, RUNNER_FIELDS, model="")
        _checked(doc, path, cfg.check)
    thresholds = _thresholds(doc, path + ("thresholds",), raw.get("thresholds", {}))
    return ArtifactSpec(name=name, type=kind, config=cfg, backends=list(backends), thresholds=thresholds,
                        line=doc.lines.get(path, 0))


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """Parse and validate recipe text; every error names the file, line and key."""
    doc = _Doc(text, where)
    d = doc.data
    if not isinstance(d, dict):
        raise doc.error((), "a recipe is a mapping with source, artifacts and optional calibration/evaluation/thresholds")
    for key, value in d.items():
        if key not in TOP_KEYS:
            raise doc.error((key,), f"unknown key; a recipe has {', '.join(TOP_KEYS)}")
        if not isinstance(value, TOP_KEYS[key]):
            raise doc.error((key,), f"must be a {TOP_KEYS[key].__name__}, got {type(value).__name__}")
    for key in ("source", "artifacts"):
        if key not in d:
            raise doc.error((), f"missing required key {key!r}")
    src = d["source"]
    if "model" not in src:
        raise doc.error(("source",), "missing required key 'model' (a folder, a cached hub id, or fixture:NAME)")
    for key, value in src.items():
        if key not in SOURCE_KEYS:
            raise doc.error(("source", key), f"unknown key; source has {', '.join(SOURCE_KEYS)}")
        if not isinstance(value, SOURCE_KEYS[key]) or (SOURCE_KEYS[key] is not bool and isinstance(value, bool)):
            raise doc.error(("source", key), f"{value!r} is not a {SOURCE_KEYS[key].__name__}")
    source = Source(**src)
    raw_calib = d.get("calibration", {})
    calib = _fill(doc, ("calibration",), CalibConfig, raw_calib)
    chat = raw_calib.get("chat")
    ecfg = _fill(doc, ("evaluation",), EvalConfig, d.get("evaluation", {}))
    _checked(doc, ("evaluation",), ecfg.check)
    if not d["artifacts"]:
        raise doc.error(("artifacts",), "needs at least one artifact")
    arts = [_artifact(doc, i, a, calib, chat) for i, a in enumerate(d["artifacts"])]
    seen: set[str] = set()
    for i, a in enumerate(arts):
        if a.name in seen:
            raise doc.error(("artifacts", i, "name"), f"duplicate artifact name {a.name!r}; names must be unique")
        seen.add(a.name)
    return Recipe(name=d.get("name") or Path(where).stem, path=Path(where), source=source, calib=calib, eval=ecfg,
                  artifacts=arts, device=d.get("device", "auto"), chat=chat,
                  thresholds=_thresholds(doc, ("thresholds",), d.get("thresholds", {})),
                  description=d.get("description", ""), text=text)


def load_recipe(path: str | Path, model: str | None = None, smoke: bool = False) -> Recipe:
    """Read a recipe file. ``model`` replaces source.model (e.g. a local copy, or ``fixture:NAME``);
    ``smoke`` shrinks calibration and evaluation to a few seconds per artifact (tests, CI smoke runs)."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"recipe {path} does not exist; pass a .yaml file (see recipes/)")
    recipe = parse_recipe(path.read_text(encoding="utf-8"), str(path))
    if model is not None:
        recipe.source.model = str(model)
    if smoke:
        shrink(recipe)
    return recipe


def shrink(recipe: Recipe) -> None:
    """Same artifacts and options, tiny data: for tiny-width stand-ins of the real models."""
    c, e = recipe.calib, recipe.eval
    c.nsamples, c.seqlen = min(c.nsamples, 8), min(c.seqlen, 64)
    e.ctx, e.max_tokens = min(e.ctx, 64), min(e.max_tokens or 1024, 1024)
    e.greedy_tokens, e.max_prompts, e.stride = min(e.greedy_tokens, 4), min(e.max_prompts or 2, 2), None
    for a in recipe.artifacts:
        cfg = a.config
        if isinstance(cfg, QuantConfig):
            cfg.calib = dataclasses.replace(cfg.calib, nsamples=c.nsamples, seqlen=c.seqlen)
        elif isinstance(cfg, GGUFExportConfig):
            cfg.nsamples, cfg.seqlen = min(cfg.nsamples, 4), min(cfg.seqlen, 64)
