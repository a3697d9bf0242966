"""`ppolm export`: LoRA adapters merged with peft, bf16 and torchao int8 weight-only exports that plain
transformers loads back and `ppolm serve` answers from."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ppolm.cli import main
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import apply_lora
from ppolm.serve import ServeLimits, create_app, load_served, serve_in_background

MODEL = "tiny-random-llama"
IDS = torch.tensor([[5, 17, 99, 42, 7]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model directory with a tokenizer and decoding settings, as the trainers write it."""
    path = tmp_path_factory.mktemp("src") / "model"
    load_model(MODEL).save_pretrained(path)
    load_tokenizer(MODEL).save_pretrained(path)
    (path / "ppolm_decoding.json").write_text(json.dumps({"max_new_tokens": 3, "task": "toy"}))
    return path


def test_lora_adapter_is_merged(tmp_path):
    torch.manual_seed(0)
    peft_model = apply_lora(load_model(MODEL), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # B starts at zero, which would make the merge trivially right
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = MODEL
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    expected = peft_model.eval()(IDS).logits
    assert main(["export", "--model", str(tmp_path / "adapter"), "--output", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_bf16_export_stores_bf16(source, tmp_path):
    assert main(["export", "--model", str(source), "--output", str(tmp_path / "bf16"), "--quantize", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "ppolm_decoding.json").read_text())["max_new_tokens"] == 3


def test_int8_export_loads_back_and_serves(source, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "int8"
    assert main(["export", "--model", str(source), "--output", str(out), "--quantize", "int8"]) == 0
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").stat().st_size < 0.6 * (source / "model.safetensors").stat().st_size
    plain = AutoModelForCausalLM.from_pretrained(source)
    model, tokenizer, served, defaults = load_served(str(out), device="cpu")
    # Weight-only int8 with per-channel scales: close to the fp32 logits, not equal.
    err = (model(IDS).logits - plain(IDS).logits).abs().max().item()
    assert 0 < err < 0.1, err
    app = create_app(model, tokenizer, model_name=served, limits=ServeLimits(), defaults=defaults)
    with serve_in_background(app) as url:
        body = {"model": served, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_export_rejects_a_bad_quantize_value(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", str(source), "--output", str(tmp_path / "x"), "--quantize", "int4"])
    assert exc.value.code == 2


# ---- the output directory never harms the source; a failed export leaves the old output whole -----------------
@pytest.fixture
def run_dir(source, tmp_path):
    """A training run as the trainers leave it: final/ (the model to export) next to the run's other files."""
    run = tmp_path / "run"
    shutil.copytree(source, run / "final")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_refuses_an_output_that_contains_the_source(run_dir, capsys, flags):
    assert main(["export", "--model", str(run_dir / "final"), "--output", str(run_dir), *flags]) == 2
    assert "contains the source" in _one_error_line(capsys)
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_refuses_an_output_inside_the_source(run_dir, capsys, flags):
    before = sorted(p.name for p in (run_dir / "final").iterdir())
    assert main(["export", "--model", str(run_dir / "final"), "--output", str(run_dir / "final" / "x"), *flags]) == 2
    assert "inside the source" in _one_error_line(capsys)
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == before


def test_export_refuses_the_source_itself_through_a_symlink(run_dir, tmp_path, capsys):
    (tmp_path / "link").symlink_to(run_dir / "final")
    assert main(["export", "--model", str(run_dir / "final"), "--output", str(tmp_path / "link"), "--overwrite"]) == 2
    _one_error_line(capsys)
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_export_replaces_a_non_empty_output_only_with_overwrite(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--model", str(source), "--output", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["export", "--model", str(source), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()  # an empty directory is as good as a new one
    assert main(["export", "--model", str(source), "--output", str(tmp_path / "empty")]) == 0


def test_a_failed_export_leaves_the_old_output_whole(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["export", "--model", str(source), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", "--model", str(source), "--output", str(out), "--overwrite", "--quantize", "bf16"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
