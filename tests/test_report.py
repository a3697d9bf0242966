"""The pipeline end to end on a tiny model, and its report rendered in headless Chromium."""

import json
import re
import shutil
from pathlib import Path

import pytest

from ppolm.config import load_config
from ppolm.pipeline import PipelineConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml", [f"output_dir={out}"])
    result = run_pipeline(cfg)
    return out, result


def test_pipeline_runs_every_stage_and_exports(pipeline_run):
    out, result = pipeline_run
    summary = json.loads((out / "summary.json").read_text())
    # the tiny model misses the bar (and its KL guard fires), so the declared adjust policy retries each PPO once
    assert list(summary["stages"]) == ["base", "sft", "ppo", "ppo-retry1", "sft-ppo", "sft-ppo-retry1"]
    assert summary["split"] == {"train": 56, "validation": 8, "test": 16, "unseen": 16}
    for name in ("ppo", "sft-ppo"):
        stage = summary["stages"][name]
        assert "guard.max_kl" in stage["guard"] and "rolled back to step" in stage["guard"], stage["guard"]
        assert (out / name / "guard.json").is_file() and (out / name / "best" / "config.json").is_file()
        assert stage["model_dir"] == str(out / name / "best")
        assert stage["checkpoint"].startswith("best/ = step "), stage["checkpoint"]
        assert not list((out / name).glob("checkpoint-*"))  # keep_checkpoints: false (default) drops them
        assert set(stage["extra"]["unseen"]) >= {"accuracy", "top_label_share"}
    # each training stage's own peak memory; the base model trains nothing
    assert summary["stages"]["base"]["train_peak_rss_mb"] is None
    peaks = [summary["stages"][s]["train_peak_rss_mb"] for s in ("sft", "ppo", "sft-ppo")]
    assert all(100 < p < 24_000 for p in peaks), peaks
    sft_rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows if "eval/accuracy" in r] == [0, 2, 4]  # eval.at_start: step 0
    ppo_cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "sft-ppo" / "config.yaml").read_text())))
    assert ppo_cfg["model"] == summary["stages"]["sft"]["model_dir"]  # SFT->PPO starts from SFT's model
    assert set(result) == {f"{s}/accuracy" for s in summary["stages"]}
    export = out / "export"
    decoding = json.loads((export / "ppolm_decoding.json").read_text())
    assert decoding["task"] == "classification" and decoding["stage"] == summary["chosen"]
    assert (export / "tokenizer_config.json").is_file()
    for stage in summary["stages"]:
        assert (out / f"eval-{stage}" / "metrics.json").is_file()
    import yaml

    first = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    second = yaml.safe_load((out / "ppo-retry1" / "config.yaml").read_text())
    assert second["optim"]["lr"] == pytest.approx(first["optim"]["lr"] * 0.5)
    assert second["kl"]["coef"] == pytest.approx(first["kl"]["coef"] * 2.0)


def test_report_is_self_contained_with_plots(pipeline_run):
    out, _ = pipeline_run
    page = (out / "report.html").read_text()
    images = re.findall(r"<img class='plot' alt='([^']+)' src='data:image/png;base64,", page)
    assert images == ["training curves", "ROC curves", "confusion matrices"]
    assert "src='http" not in page and 'src="http' not in page
    md = (out / "report.md").read_text()
    assert "| stage | accuracy" in md and "train peak MB |" in md and "## Sample outputs, every stage" in md
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert all(f"  - {stage}: " in md for stage in stages)  # every stage's answer to each sample
    assert "## Task metrics on unseen" in md and "## Guardrails" in md and "guard.max_kl" in md
    assert re.search(r"- PPO vs the base model: [+-]\d\.\d{3} accuracy on the test split, [+-]\d\.\d{3} on unseen", md)
    assert re.search(r"- SFT->PPO vs SFT: .* -- (better on every set|not better on any set|better on some sets only)\.", md)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed")
def test_report_renders_in_headless_chromium(pipeline_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out, _ = pipeline_run
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        sizes = driver.execute_script(
            "return [...document.querySelectorAll('img.plot')].map(i => [i.alt, i.complete, i.naturalWidth])")
        assert [s[0] for s in sizes] == ["training curves", "ROC curves", "confusion matrices"]
        assert all(complete and width > 100 for _, complete, width in sizes), sizes
        assert driver.find_element("tag name", "table").text.startswith("stage")
    finally:
        driver.quit()
