"""Every shipped config validates, names data that exists, and the demo trains on the shipped real data."""

from pathlib import Path

import pytest
import yaml

from ppolm.config import PPORunConfig, load_config
from ppolm.pipeline import PipelineConfig
from ppolm.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def _kind(path: Path):
    if (yaml.safe_load(path.read_text()) or {}).get("flow") == "rlhf":
        from ppolm.rlhf.config import RLHFConfig

        return RLHFConfig
    if path.name.startswith("pipeline-"):
        return PipelineConfig
    if path.name.startswith("sft-"):
        from ppolm.trainers.sft import SFTRunConfig

        return SFTRunConfig
    if path.name.startswith("rm-"):
        from ppolm.trainers.rm import RMRunConfig

        return RMRunConfig
    if path.name.startswith("dpo-"):
        from ppolm.trainers.dpo import DPORunConfig

        return DPORunConfig
    return PPORunConfig


def _paths(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates_and_its_data_exists(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(_kind(path), path)
    for f in getattr(getattr(cfg, "data", None), "files", []):  # the RLHF flow's sentence files
        assert (ROOT / f).exists(), f"{path.name}: {f} missing"
    task = getattr(cfg, "task", None)
    if task is None:
        return
    files = _paths(task.data) + _paths(task.eval_data)
    files += [f for v in getattr(getattr(cfg, "eval", None), "extra", {}).values() for f in _paths(v)]
    for f in files:
        if "shared/data/" in f and not (ROOT / f).exists() and not (ROOT.parent / "shared").is_dir():
            pytest.skip(f"{path.name} reads research-only data in place from ../shared, absent here")
        assert (ROOT / f).exists() or Path(f).exists(), f"{path.name}: {f} missing"
    # templated demo data is for tests only: every config that does not run on a tiny model names real data
    model = yaml.safe_load(path.read_text()).get("model", "smollm2-135m-instruct")
    if not str(model).startswith("tiny-random") and task.name in ("classification", "ner", "translation"):
        assert task.data is not None, f"{path.name} trains on the templated demo set"


def test_demo_reads_real_sentences_from_two_domains_and_tests_on_a_third(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-demo.yaml")
    task = build_task(cfg.task.name, cfg.task.options)
    train = task.load_all(cfg.task.data)
    unseen = task.load_all(cfg.eval.extra["imdb_unseen_domain"])
    assert 1900 < len(train) <= 2000 and 990 < len(unseen) <= 1000
    assert {e.source.split("/")[-1] for e in train} == {"amazon_cells_labelled.txt", "yelp_labelled.txt"}
    for rows in (train, unseen):
        labels = [e.fields["label"] for e in rows]
        assert abs(labels.count("positive") - labels.count("negative")) < 0.05 * len(labels)
    assert cfg.stages.ppo_starts() == ["base", "sft"]
    assert (ROOT / "data/sentiment_sentences/ATTRIBUTION.md").read_text().count("CC BY 4.0") >= 1
