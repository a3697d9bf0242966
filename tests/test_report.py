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
    assert re.search(r"- PPO vs the base model: [+-]\d\.\d{3}( ± \d\.\d{3})? accuracy on the test split, [+-]\d\.\d{3}( ± \d\.\d{3})? on unseen", md)
    assert re.search(r"- SFT->PPO vs SFT: .* -- (better on every set|not better on any set( \(every difference within the noise\))?|better on some sets only)\.", md)


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
        assert driver.find_element("css selector", "table tr").text.startswith("stage")  # (a caption may follow)
    finally:
        driver.quit()


# ---- the report's layout, on runs written here (no pipeline run needed) ----------------------------------------
def _synthetic_runs(tmp_path: Path) -> list:
    """Candidates as the pipeline hands them to the report: base (no run), sft, ppo and sft-ppo runs whose
    metrics.jsonl hold every curve the report draws, held-out checks with their standard error, a guard stop,
    and test metrics with `accuracy_se` beside `accuracy`."""
    from types import SimpleNamespace

    cands = []
    for i, name in enumerate(["base", "sft", "ppo", "sft-ppo"]):
        run = None
        if name != "base":
            run = tmp_path / name
            run.mkdir()
            rows = []
            for step in range(0, 17):
                r = {"step": step}
                if name == "sft":
                    r["loss/sft"] = 2.0 / (1 + step)
                else:
                    r.update({"reward/mean": 0.3 + step / 40, "objective/kl": step / 10, "policy/entropy": 2 - step / 20,
                              "response/length_mean": 8 - step / 4, "loss/value": 1 / (1 + step)})
                if step % 4 == 0:
                    r.update({"eval/accuracy": 0.5 + 0.02 * step + 0.01 * i, "eval/accuracy_se": 0.06})
                rows.append(r)
            if name == "ppo":
                rows[12]["guard/stopped"] = 1.0
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"accuracy": 0.873 - 0.1 * (name == "base"), "accuracy_se": 0.0275, "f1_macro": 0.8}
        cands.append(SimpleNamespace(
            name=name, model_dir=str(run or "tiny"), metrics=metrics, train_seconds=10.0, eval_seconds=1.0,
            predictions=[{"prompt": "a fine film", "reference": "positive", "completion": "positive"}],
            run_dir=None if run is None else str(run), extra={"unseen": dict(metrics)}, guard=None, checkpoint=None,
            train_peak_mb=None, validation={}))
    return cands


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_training_curves_panels_are_wide_and_the_held_out_one_is_the_largest(tmp_path):
    from ppolm.eval.report import curves_figure, training_curves

    cands = _synthetic_runs(tmp_path)
    width, height = _png_size(training_curves(cands, "accuracy"))
    # two panels a row, and no wider than the report's 1100 px column (a browser would shrink it)
    assert 2 * 400 <= width <= 1100, (width, height)
    fig = curves_figure(cands, "accuracy")
    fig.canvas.draw()
    boxes = {ax.get_title(): ax.get_window_extent() for ax in fig.axes}  # pixels at the PNG's dpi
    assert len(boxes) == 7, list(boxes)  # held-out, SFT loss, 5 PPO curves
    assert all(b.width >= 400 for b in boxes.values()), {t: b.width for t, b in boxes.items()}
    held_out = next(t for t in boxes if t.startswith("held-out accuracy"))
    area = {t: b.width * b.height for t, b in boxes.items()}
    assert max(area, key=area.get) == held_out and "95% interval" in held_out and "guard stopped" in held_out
    # a ±1.96 se band around each run's held-out curve
    ax = next(a for a in fig.axes if a.get_title() == held_out)
    assert len(ax.collections) == 3
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.51 - 1.96 * 0.06, abs=1e-3)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_tables_print_value_and_95_interval_where_a_standard_error_exists(tmp_path):
    from ppolm.eval.report import metrics_table

    cands = _synthetic_runs(tmp_path)
    header, rows = metrics_table(cands)
    assert header[:3] == ["stage", "accuracy", "f1_macro"]  # accuracy_se is no column of its own
    assert rows[1][1:3] == ["0.873 ± 0.054", "0.8000"]
    html_path, md_path = _write_synthetic_report(cands, tmp_path)
    md = md_path.read_text()
    assert "| sft | 0.873 ± 0.054 | 0.8000 |" in md
    assert md.count("95% normal interval") == 2  # the test split's table and the unseen set's
    assert html_path.read_text().count("<caption>value ± h: a 95% normal interval") == 2


def _write_synthetic_report(cands: list, out: Path) -> tuple[Path, Path]:
    from types import SimpleNamespace

    from ppolm.eval.report import write_report

    cfg = SimpleNamespace(task=SimpleNamespace(name="classification"), model="tiny",
                          target=SimpleNamespace(metric="accuracy", higher_is_better=True, min=0.8))
    return write_report(cfg, None, cands, cands[2], out, {"export_dir": str(out / "export"), "wall_seconds": 42.0})


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed")
def test_training_curves_read_at_1280_px_in_headless_chromium(tmp_path):
    """At a 1280 px window the curves are shown at their own size: each panel >= 400 css px. The screenshot
    goes to $PPOLM_REPORT_SCREENSHOT when set, for a person to look at."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    html_path, _ = _write_synthetic_report(_synthetic_runs(tmp_path), tmp_path)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_window_size(1280, 1000)
        driver.get(html_path.resolve().as_uri())
        shown, natural = driver.execute_script(
            "const i = document.querySelector(\"img[alt='training curves']\"); i.scrollIntoView();"
            "return [i.getBoundingClientRect().width, i.naturalWidth]")
        assert shown == natural and shown / 2 >= 400, (shown, natural)
        assert driver.find_element("css selector", "table tr").text.startswith("stage")
        caption = driver.find_element("css selector", "table caption")
        assert "95% normal interval" in caption.text  # under the table, not above its header
        assert caption.location["y"] > driver.find_element("css selector", "table tr").location["y"]
        if os.environ.get("PPOLM_REPORT_SCREENSHOT"):
            driver.save_screenshot(os.environ["PPOLM_REPORT_SCREENSHOT"])
    finally:
        driver.quit()
