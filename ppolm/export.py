"""`ppolm export`: a model directory ready for serving, by ppolm or any transformers-based server.

The source is any model ppolm can load (a known name, an exported or `final/` directory) or a LoRA adapter
directory (`adapter_config.json`), whose adapters are merged into the base weights with peft. The weights can
be stored in bf16, or int8 weight-only with torchao (per-channel symmetric int8 weights, activations in the
model's float dtype; transformers loads such a directory back with torchao installed, on CPU and GPU).
Tokenizer, chat template and `ppolm_decoding.json` are kept, so `ppolm serve --model OUT` behaves the same.

The output is written atomically (a temporary directory next to it, then a rename). An output that is the
source, contains it or lies inside it is refused, and so is a non-empty one unless `overwrite` is set.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ppolm.errors import ConfigError, ModelLoadError
from ppolm.state_io import atomic_directory, load_json
from ppolm.tasks.base import DECODING_FILE

QUANTIZE = ("none", "bf16", "int8")
ADAPTER_FILE = "adapter_config.json"


def load_merged(src: str) -> PreTrainedModel:
    """The model at `src` as a plain transformers model: a LoRA adapter directory is merged into its base."""
    from ppolm.models import load_model

    path = Path(src)
    if not (path / ADAPTER_FILE).is_file():
        return load_model(src)
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(src).base_model_name_or_path
    if not base_name:
        raise ModelLoadError(f"{path / ADAPTER_FILE}: base_model_name_or_path is empty; cannot merge the adapter")
    return PeftModel.from_pretrained(load_model(base_name), src).merge_and_unload()


def export_model_dir(src: str, out: str | Path, quantize: str = "none", overwrite: bool = False) -> Path:
    """Write `src` to `out` with weights as `quantize` says: 'none', 'bf16' or 'int8'. A non-empty `out` is
    replaced only with `overwrite`, and only once the new directory is complete."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got '{quantize}'")
    from ppolm.models import load_tokenizer

    out = Path(out)
    check_output(out, _local_sources(src), overwrite)
    model = load_merged(src)
    tokenizer = load_tokenizer(_tokenizer_source(src))
    if quantize == "bf16":
        model = model.to(torch.bfloat16)
    if quantize == "int8":
        model = _int8_weight_only(model)
    with atomic_directory(out) as tmp:  # a failed export leaves the old `out` as it was
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        decoding = Path(src) / DECODING_FILE
        if decoding.is_file():
            shutil.copy2(decoding, tmp / DECODING_FILE)
    return out


def check_output(out: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output directory that is one of `sources`, contains one or lies inside one (replacing it
    would delete or alter the model being exported), one that is not a directory, and a non-empty one
    without `overwrite`."""
    where = out.resolve()
    for src in sources:
        src = src.resolve()
        if where == src or where in src.parents:
            raise ConfigError(f"export: the output directory {out} is or contains the source {src}; "
                              f"choose another --output")
        if src in where.parents:
            raise ConfigError(f"export: the output directory {out} is inside the source {src}; "
                              f"choose another --output")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: the output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export: the output directory {out} is not empty; pass --overwrite to replace it")


def _local_sources(src: str) -> list[Path]:
    # Every directory the export reads from: the source, and an adapter's base model when that is a directory.
    path = Path(src)
    if not path.exists():
        return []  # a model name, not a directory
    found = [path]
    if (path / ADAPTER_FILE).is_file():
        base = str(load_json(path / ADAPTER_FILE).get("base_model_name_or_path") or "")
        if base and Path(base).exists():
            found.append(Path(base))
    return found


def _tokenizer_source(src: str) -> str:
    # An adapter directory may hold no tokenizer; its base model's is the right one then.
    path = Path(src)
    if (path / ADAPTER_FILE).is_file() and not any(path.glob("tokenizer*")):
        from peft import PeftConfig

        return PeftConfig.from_pretrained(src).base_model_name_or_path
    return src


def _int8_weight_only(model: PreTrainedModel) -> PreTrainedModel:
    """Reload `model` through transformers' torchao integration, so config.json records the quantization and
    `from_pretrained` restores it."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ConfigError("--quantize int8 needs torchao: pip install 'ppolm[quant]'") from None
    from transformers import AutoModelForCausalLM, TorchAoConfig

    with tempfile.TemporaryDirectory(prefix="ppolm-export-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return AutoModelForCausalLM.from_pretrained(
            tmp, dtype=model.dtype, quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        )
