"""`ppolm export`: a model directory ready for serving, by ppolm or any transformers-based server.

The source is any model ppolm can load (a known name, an exported or `final/` directory) or a LoRA adapter
directory (`adapter_config.json`), whose adapters are merged into the base weights with peft. The weights can
be stored in bf16, or int8 weight-only with torchao (per-channel symmetric int8 weights, activations in the
model's float dtype; transformers loads such a directory back with torchao installed, on CPU and GPU).
Tokenizer, chat template and `ppolm_decoding.json` are kept, so `ppolm serve --model OUT` behaves the same.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ppolm.errors import ConfigError, ModelLoadError

QUANTIZE = ("none", "bf16", "int8")
ADAPTER_FILE = "adapter_config.json"
DECODING_FILE = "ppolm_decoding.json"


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


def export_model_dir(src: str, out: str | Path, quantize: str = "none") -> Path:
    """Write `src` to `out` (replaced if present) with weights as `quantize` says: 'none', 'bf16' or 'int8'."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got '{quantize}'")
    from ppolm.models import load_tokenizer

    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise ConfigError(f"export: the output directory is the source ({out})")
    model = load_merged(src)
    tokenizer = load_tokenizer(_tokenizer_source(src))
    if out.exists():
        shutil.rmtree(out)
    if quantize == "bf16":
        model = model.to(torch.bfloat16)
    if quantize == "int8":
        model = _int8_weight_only(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    decoding = Path(src) / DECODING_FILE
    if decoding.is_file():
        shutil.copy2(decoding, out / DECODING_FILE)
    return out


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
