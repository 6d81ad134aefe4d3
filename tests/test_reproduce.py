"""reproduce/grid.py: the smoke grid runs every default method through `tartan`, tabulates what it recorded,
resumes without redoing finished work, reruns an interrupted stage, and survives a failing one."""
import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "reproduce" / "grid.py"
SMOKE = REPO / "reproduce" / "profiles" / "smoke.yaml"


def load_grid():
    """The script as a module (it is not in a package); registered first, as dataclasses require."""
    spec = importlib.util.spec_from_file_location("reproduce_grid", GRID)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


grid = load_grid()


def run_script(*args: str) -> subprocess.CompletedProcess:
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {**os.environ, **offline, "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(GRID), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def started(output: str) -> list[str]:
    """The stages a grid run started, from its one-line-per-stage log."""
    return re.findall(r"\bstart\s+(\S+)", output)


def record(task: str, method: str, seed: int, score: float) -> dict:
    return {"task": task, "method": method, "seed": seed, "metric": "f1_macro", "test_score": score}


def test_summary_is_mean_sample_sd_and_n_per_task_and_method():
    records = [
        record("sciie", "mt_tartan", 0, 0.70),
        record("sciie", "mt_tartan", 1, 0.80),
        record("sciie", "mt_tartan", 2, 0.90),
        record("sciie", "fine_tuning", 0, 0.50),
        record("chemprot", "mt_tartan", 0, 0.60) | {"metric": "accuracy"},
    ]
    table = grid.summarize(records)

    assert table["sciie"]["mt_tartan"]["mean"] == pytest.approx(0.80)
    assert table["sciie"]["mt_tartan"]["sd"] == pytest.approx(0.10)  # n - 1: population sd would be 0.0816
    assert (table["sciie"]["mt_tartan"]["n"], table["sciie"]["mt_tartan"]["seeds"]) == (3, [0, 1, 2])
    assert table["sciie"]["fine_tuning"] == {"metric": "f1_macro", "mean": 0.50, "sd": None, "n": 1, "seeds": [0]}
    assert table["chemprot"]["mt_tartan"]["metric"] == "accuracy"

    meta = {"commands": ["python reproduce/grid.py"], "profiles": ["cpu"], "encoders": ["e"], "precisions": ["p"]}
    meta |= {"hardware": ["h"], "dates": ["d0", "d1"]}
    text = grid.markdown(table, meta, paper={"sciie": {"mt_tartan": "81.2 (0.5)"}})
    assert "| Method | sciie (f1_macro) | sciie, paper | chemprot (accuracy) |" in text
    assert "| mt_tartan | 80.0 ± 10.0 (3) | 81.2 (0.5) | 60.0 (1) |" in text
    assert "| fine_tuning | 50.0 (1) | – | – |" in text
    only_other_methods = grid.markdown(table, meta, paper={"sciie": {"tapt_fine_tuning": "79.3 (1.5)"}})
    assert "| Method | sciie (f1_macro) | chemprot (accuracy) |" in only_other_methods  # no column of dashes


def test_methods_sharing_a_stage_form_one_chain_in_dependency_order(tmp_path):
    chains = grid.plan(["sciie"], grid.DEFAULT_METHODS, [0], tmp_path)
    folders = [[step.folder for step in chain.steps] for chain in chains]
    assert folders == [
        ["baseline", "baseline-test"],
        ["tapt", "tapt_finetune", "tapt_finetune-test"],
        ["mt_tartan", "mt_tartan-test", "mt_tartan_posthoc", "mt_tartan_posthoc-test"],
        ["meta_tartan", "meta_tartan-test", "meta_tartan_posthoc", "meta_tartan_posthoc-test"],
    ]


@pytest.mark.long
def test_smoke_grid_end_to_end(tiny_encoder, data_root, cache_dir, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    common = ["--profile", str(SMOKE), "--tasks", "citation_intent", "--seeds", "0", "--encoder", tiny_encoder]
    common += ["--data-root", str(data_root), "--out", str(out), "--results", str(results), "--jobs", "2"]
    passthrough = ["--", f"--data.init_args.cache_dir={cache_dir}"]

    first = run_script(*common, *passthrough)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "summary: ran 13 stages, skipped 0, failed 0; recorded 6 results" in first.stdout

    # ---- the records and the three tables agree ----
    runs = json.loads((results / "runs.json").read_text())
    assert sorted(r["method"] for r in runs) == sorted(grid.DEFAULT_METHODS)
    for r in runs:
        described = (r["task"], r["seed"], r["metric"], r["profile"], r["encoder"], r["precision"])
        assert described == ("citation_intent", 0, "f1_macro", "smoke", tiny_encoder, "32-true")
        assert r["test_score"] == r["test_f1_macro"] and 0 <= r["test_accuracy"] <= 1 and 0 <= r["dev_score"] <= 1
        assert r["commands"][-1].split()[1] == "test" and r["wall_seconds"] > 0
    summary = json.loads((results / "results.json").read_text())
    scores: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        scores.setdefault((r["task"], r["method"]), []).append(r["test_score"])
    for (task, method), values in scores.items():
        cell = summary["results"][task][method]
        assert (cell["metric"], cell["n"]) == ("f1_macro", len(values))
        assert cell["mean"] == pytest.approx(statistics.fmean(values))
        assert cell["sd"] == (pytest.approx(statistics.stdev(values)) if len(values) > 1 else None)
    assert summary["meta"]["profiles"] == ["smoke"] and summary["meta"]["records"] == 6
    table = (results / "results.md").read_text()
    assert f"--profile {SMOKE}" in runs[0]["grid_command"]
    assert f"- Command: `{runs[0]['grid_command']}`" in table  # the exact command heads the table
    for method in grid.DEFAULT_METHODS:
        mean = summary["results"]["citation_intent"][method]["mean"]
        assert f"| {method} | {100 * mean:.1f} (1) |" in table
    assert (results / "results.png").read_bytes().startswith(b"\x89PNG")

    # ---- what the stages did ----
    by_method = {r["method"]: r for r in runs}
    seed_dir = out / "citation_intent" / "seed0"
    with (seed_dir / "baseline" / "logs" / "metrics.csv").open() as stream:
        dev = [float(row["val/f1_macro"]) for row in csv.DictReader(stream) if row["val/f1_macro"]]
    assert by_method["fine_tuning"]["dev_score"] == max(dev) and by_method["fine_tuning"]["dev_evaluations"] == dev
    for method in ("mt_tartan_posthoc", "meta_tartan_posthoc"):
        selection = by_method[method]["selection"]
        assert selection["selected"] in ("start", "fine_tuned")
        assert by_method[method]["dev_score"] == selection[f"{selection['selected']}_score"]
        assert "--model.init_checkpoint=" in by_method[method]["commands"][1]
    weighting = by_method["meta_tartan_posthoc"]["task_weighting"]
    assert weighting["stage"] == "meta_tartan" and set(weighting["last_weight"]) == {"end_task", "tapt"}
    assert "task_weighting" not in by_method["mt_tartan"]
    # the overlay replaced the config's callback list: the export went to the stage folder, not exports/<task>/tapt
    assert (seed_dir / "tapt" / "export" / "config.json").is_file()
    assert not (seed_dir / "tapt" / "exports").exists()
    export = seed_dir / "tapt" / "export"
    assert f"--model.encoder_name_or_path={export}" in by_method["tapt_fine_tuning"]["commands"][1]
    assert sorted(path.name for path in (seed_dir / "mt_tartan" / "checkpoints").iterdir()) == ["best.ckpt"]

    # ---- a second invocation finds everything done ----
    record_files = sorted((out / "records").iterdir())
    before = {path: path.stat().st_mtime_ns for path in record_files}
    again = run_script(*common, *passthrough)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "6 of 6 (task, method, seed) results recorded earlier; 0 chains to run" in again.stdout
    assert started(again.stdout) == []
    assert {path: path.stat().st_mtime_ns for path in record_files} == before

    # ---- killed during baseline's test; and a stage that fails (its start checkpoint is gone) ----
    (out / "records" / "citation_intent-fine_tuning-seed0.json").unlink()
    (seed_dir / "baseline-test" / "done.json").unlink()
    (seed_dir / "baseline-test" / "partial.txt").write_text("left by a killed run")
    (out / "records" / "citation_intent-mt_tartan_posthoc-seed0.json").unlink()
    (seed_dir / "mt_tartan_posthoc" / "done.json").unlink()
    (seed_dir / "mt_tartan" / "checkpoints" / "best.ckpt").unlink()
    resumed = run_script(*common, "--methods", "fine_tuning", "mt_tartan_posthoc", *passthrough)

    assert resumed.returncode != 0
    rerun = ["citation_intent/seed0/baseline-test", "citation_intent/seed0/mt_tartan_posthoc"]
    assert sorted(started(resumed.stdout)) == rerun
    assert not (seed_dir / "baseline-test" / "partial.txt").exists()
    assert (seed_dir / "baseline-test" / "done.json").is_file()
    assert (out / "records" / "citation_intent-fine_tuning-seed0.json").is_file()  # the other chain went on
    assert "summary: ran 1 stages, skipped 2, failed 1; recorded 1 results" in resumed.stdout
    assert "FAILED citation_intent/seed0/mt_tartan_posthoc: exit status" in resumed.stdout
    assert f"log: {seed_dir / 'mt_tartan_posthoc' / 'log.txt'}" in resumed.stdout
    assert not (seed_dir / "mt_tartan_posthoc" / "done.json").exists()
    assert len(json.loads((results / "runs.json").read_text())) == 5  # tables rebuilt from what is recorded

    # ---- a rerun with another encoder or tartan option is refused, not mixed into the same table ----
    (out / "records" / "citation_intent-fine_tuning-seed0.json").unlink()
    other_encoder = [str(tmp_path / "another_encoder") if arg == tiny_encoder else arg for arg in common]
    refused = run_script(*other_encoder, "--methods", "fine_tuning", *passthrough)
    other_options = run_script(*common, "--methods", "fine_tuning", *passthrough, "--trainer.max_steps=40")
    for mixed in (refused, other_options):
        assert mixed.returncode != 0 and started(mixed.stdout) == []
        assert f"--out {out} holds runs made with other settings" in mixed.stderr
    assert f"encoder: {tiny_encoder!r} there, {str(tmp_path / 'another_encoder')!r} now" in refused.stderr
    assert "tartan_options" in other_options.stderr and "--trainer.max_steps=40" in other_options.stderr
    assert not (out / "records" / "citation_intent-fine_tuning-seed0.json").exists()
    assert run_script(*common, "--methods", "fine_tuning", *passthrough).returncode == 0  # the same settings go on
    assert (out / "records" / "citation_intent-fine_tuning-seed0.json").is_file()

    # ---- the tables alone, from the records, running nothing even though a result is missing ----
    recorded = (results / "runs.json").read_text()
    shutil.rmtree(results)
    tables = run_script(*common, "--aggregate-only")
    assert tables.returncode == 0, tables.stdout[-4000:] + tables.stderr[-4000:]
    assert started(tables.stdout) == [] and len(list((out / "records").iterdir())) == 5
    assert (results / "runs.json").read_text() == recorded
    assert {path.name for path in results.iterdir()} == {"runs.json", "results.json", "results.md", "results.png"}


def test_the_published_tables_rebuild_from_their_runs_json(tmp_path):
    """docs/results ships the records as runs.json: `--aggregate-only` rebuilds its tables from them alone."""
    published = REPO / "docs" / "results"
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(published / "runs.json", results)
    tables = run_script("--profile", str(REPO / "reproduce" / "profiles" / "cpu.yaml"), "--aggregate-only",
                        "--out", str(tmp_path / "no_records"), "--results", str(results))
    assert tables.returncode == 0, tables.stdout[-4000:] + tables.stderr[-4000:]
    assert f"rebuilding from {results / 'runs.json'}" in tables.stdout
    for name in ("results.json", "results.md"):
        assert (results / name).read_text() == (published / name).read_text()


def test_an_interrupted_grid_tabulates_what_finished_into_its_own_folder(tmp_path, monkeypatch):
    """Ctrl-C still rebuilds the tables from the records written so far, and by default they go beside the runs,
    never over the published ones in docs/results."""
    out = tmp_path / "runs"
    provenance = {"grid_command": "python reproduce/grid.py", "profile": "smoke", "encoder": "e"}
    provenance |= {"precision": "32-true", "hardware": "h", "date": "2026-11-28T00:00:00+00:00"}
    finished = record("sciie", "fine_tuning", 0, 0.5) | provenance
    grid.write_json(grid.record_path(out, "sciie", "fine_tuning", 0), finished)
    published = (REPO / "docs" / "results" / "runs.json").read_text()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "run_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid.main(["--profile", str(SMOKE), "--out", str(out)])
    assert [r["method"] for r in json.loads((out / "results" / "runs.json").read_text())] == ["fine_tuning"]
    assert "| fine_tuning | 50.0 (1) |" in (out / "results" / "results.md").read_text()
    assert (REPO / "docs" / "results" / "runs.json").read_text() == published


def test_a_folder_is_claimed_by_its_first_record_and_compares_what_stages_compute(tmp_path):
    profile = grid.load_profile(SMOKE)
    spelt_apart = grid.grid_settings(profile, "../x/enc", "/abs/enc", tmp_path, ("--opt", "4"))
    assert spelt_apart == grid.grid_settings(profile, "/abs/enc", "/abs/enc", tmp_path, ("--opt=4",))
    out = tmp_path / "runs"
    typo = grid.grid_settings(profile, "/abs/enc", "/abs/enc", tmp_path, ("--opt=5",))
    grid.claim_output_folder(out, typo)
    grid.claim_output_folder(out, spelt_apart)  # nothing recorded yet: a corrected rerun takes the folder over
    grid.write_json(grid.record_path(out, "sciie", "fine_tuning", 0), {})
    with pytest.raises(SystemExit, match=re.escape("tartan_options: ['--opt=4'] there, ['--opt=5'] now")):
        grid.claim_output_folder(out, typo)
    with pytest.raises(SystemExit, match="data_root"):
        grid.claim_output_folder(out, grid.grid_settings(profile, "/abs/enc", "/abs/enc", tmp_path / "b", ("--opt=4",)))
    grid.claim_output_folder(out, spelt_apart)


def test_unknown_task_is_refused_before_anything_runs(tmp_path):
    result = run_script("--profile", str(SMOKE), "--tasks", "acl_arc", "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and started(result.stdout) == []
    assert "invalid choice: 'acl_arc'" in result.stderr and "citation_intent" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_gradient_alignment_reports_every_estimator(tiny_encoder, data_root, tmp_path):
    """reproduce/gradient_alignment.py: one cosine per batch, estimator and objective, all in [-1, 1], and the
    tables it writes say the same."""
    script = REPO / "reproduce" / "gradient_alignment.py"
    out = tmp_path / "alignment"
    result = subprocess.run(
        [sys.executable, str(script), "--encoder", tiny_encoder, "--data-root", str(data_root), "--batches", "3"]
        + ["--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cosines = json.loads(out.with_suffix(".json").read_text())["cosines"]
    estimators = [name for name in cosines if name != "yardstick"]
    assert len(estimators) == 5
    for name in estimators:
        assert set(cosines[name]) == {"end_task", "tapt"}
        assert all(len(values) == 3 and all(-1 <= v <= 1 for v in values) for values in cosines[name].values())
    assert len(cosines["yardstick"]["end_task vs the previous batch's end_task"]) == 2
    table = out.with_suffix(".md").read_text()
    mean = statistics.fmean(cosines[estimators[0]]["end_task"])
    assert f"| {estimators[0]} | {mean:+.3f} ±" in table


def test_gradient_alignment_refuses_too_few_batches_before_measuring(tmp_path):
    script = REPO / "reproduce" / "gradient_alignment.py"
    out = tmp_path / "alignment"
    result = subprocess.run([sys.executable, str(script), "--batches", "2", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "--batches 2: at least 3" in result.stderr
    assert not out.with_suffix(".json").exists()
