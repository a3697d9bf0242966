"""Train -> export -> serve, for every model directory the product writes: the pipeline's export, PPO's final/
and SFT's final/, each built here by the product itself on tiny-random-llama, then loaded by plain transformers
(what vLLM and TGI read) and served by `ppolm serve`, answered through the openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import free_port

from ppolm.cli import main
from ppolm.serve import ServeLimits, create_app, load_served, serve_in_background

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("pipeline", "ppo", "sft")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """{kind: model directory} built by `ppolm run`, `ppolm ppo` and `ppolm sft` with the tiny configs, shortened."""
    base = tmp_path_factory.mktemp("chain")
    quiet = ["log.progress=false", "log.tensorboard=false"]
    assert main(["run", str(ROOT / "configs/pipeline-tiny.yaml"), f"output_dir={base / 'pipe'}", "sft.max_steps=2",
                 "ppo.max_steps=1", "adjust.max_retries=0", "report=false", "eval.limit=4"]) == 0
    assert main(["ppo", "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={base / 'ppo'}", "max_steps=2",
                 "checkpoint.every=0", *quiet]) == 0
    assert main(["sft", "--config", str(ROOT / "configs/sft-tiny.yaml"), f"output_dir={base / 'sft'}", "max_steps=2",
                 "eval_every=0", "checkpoint.every=0", *quiet]) == 0
    return {"pipeline": base / "pipe" / "export", "ppo": base / "ppo" / "final", "sft": base / "sft" / "final"}


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_with_plain_transformers(exported, kind):
    path = exported[kind]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (path / "model.safetensors").is_file() and not (path / "adapter_config.json").exists()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in out[0].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_exported_model_served_through_openai_client(exported, kind):
    model, tokenizer, served, defaults = load_served(str(exported[kind]), device="cpu")
    assert served == exported[kind].name
    app = create_app(model, tokenizer, model_name=served, limits=ServeLimits(), defaults=defaults, api_key="k")
    with serve_in_background(app) as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        assert [m.id for m in oai.models.list()] == [served]
        chat = oai.chat.completions.create(model=served, messages=[{"role": "user", "content": "great film"}],
                                           max_tokens=4)
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 4
        text = oai.completions.create(model=served, prompt="Review: fine", max_tokens=3, temperature=0.8, seed=1)
        assert text.choices[0].finish_reason in ("stop", "length")
        stream = oai.chat.completions.create(model=served, messages=[{"role": "user", "content": "hello"}],
                                             max_tokens=5, stream=True, extra_body={"ignore_eos": True})
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
        assert finishes[-1] == "length"


def test_ppolm_serve_command_answers_the_pipeline_export(exported):
    """The acceptance path: `ppolm serve --model EXPORT` answers chat with 200; the key comes from PPOLM_API_KEY."""
    port = free_port()
    env = {**os.environ, "PPOLM_API_KEY": "sk-env", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ppolm.cli", "serve", "--model", str(exported["pipeline"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
            body = {"model": "export", "messages": [{"role": "user", "content": "a fine film"}], "max_tokens": 4}
            assert client.post("/v1/chat/completions", json=body).status_code == 401
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-env"})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if the serve extra were not installed
    assert main(["serve", "--model", "tiny-random-llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ppolm[serve]'" in err
