"""ppolm_decoding.json: SFT final/, PPO final/ and the pipeline's export write it from one function, with the
task's decoding (max_new_tokens included) and system prompt, whatever the PPO rollout used."""

import json
from pathlib import Path
from types import SimpleNamespace

from ppolm.config import PPORunConfig, load_config
from ppolm.pipeline import export_candidate
from ppolm.serve.engine import DECODING_KEYS
from ppolm.tasks import build_task
from ppolm.tasks.base import DECODING_FILE, decoding_record
from ppolm.trainers.ppo import PPOTrainer
from ppolm.trainers.sft import SFTRunConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]


def test_sft_ppo_and_pipeline_write_the_same_decoding_settings(tmp_path):
    task = build_task("classification", {})
    sft = load_config(SFTRunConfig, ROOT / "configs/sft-tiny.yaml",
                      [*QUIET, f"output_dir={tmp_path / 'sft'}", "max_steps=1", "eval_every=0", "checkpoint.every=0"])
    SFTTrainer(sft).train()
    # a rollout length and stop string of its own: training settings, not what the exported model is served with
    ppo = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                      [*QUIET, f"output_dir={tmp_path / 'ppo'}", "max_steps=1", "checkpoint.every=0",
                       "task.name=classification", "task.options={}", "rollout.batch_size=8",
                       "rollout.max_new_tokens=5", "rollout.stop=[';']"])
    PPOTrainer(ppo).train()
    export = export_candidate(SimpleNamespace(name="sft", model_dir=str(tmp_path / "sft" / "final")), task,
                              tmp_path / "export", "tiny-random-llama")
    written = {kind: json.loads((path / DECODING_FILE).read_text()) for kind, path in
               [("sft", tmp_path / "sft" / "final"), ("ppo", tmp_path / "ppo" / "final"), ("pipeline", export)]}
    expected = decoding_record(task.decoding, task.system_prompt, task="classification")
    assert set(expected) >= DECODING_KEYS  # every setting serving reads
    for kind, record in written.items():
        assert {k: record[k] for k in expected} == expected, kind
    assert written["ppo"]["max_new_tokens"] == task.decoding.max_new_tokens == 12
    assert written["pipeline"]["stage"] == "sft" and written["pipeline"]["base_model"] == "tiny-random-llama"
