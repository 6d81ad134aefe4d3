"""README.md must not rot: its Python example runs (tiny encoder, a few steps), the configs it names exist and its
results are the committed ones."""
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
TASKS = ("citation_intent", "sciie", "chemprot", "hyperpartisan")
README = (REPO / "README.md").read_text()


def readme_python_example() -> str:
    """The first ```python block after the "## Use from Python" heading."""
    section = README.split("\n## Use from Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def shrink(code: str, replacements: dict[str, str]) -> str:
    """Swap the paper-sized settings for test-sized ones; each must still be in the example, or this test
    would silently run something else than the README shows."""
    for old, new in replacements.items():
        assert old in code, f"README example no longer contains {old!r}; update tests/test_readme.py"
        code = code.replace(old, new)
    return code


def test_python_example_trains_tests_and_exports(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = shrink(
        readme_python_example(),
        {
            '"roberta-base"': repr(tiny_encoder),
            '"../shared/data/dsp/citation_intent"': repr(str(data_root / "citation_intent")),
            "CitationIntentDataModule(": (
                "CitationIntentDataModule(max_length=32, batch_size=4, aux_batch_size=4, dev_batch_size=4, "
                f"eval_batch_size=16, cache_dir={cache_dir!r}, "
            ),
            "max_epochs=150": "max_steps=2, limit_val_batches=2, limit_test_batches=2, enable_progress_bar=False",
            "val_check_interval=30": "val_check_interval=2",
        },
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    trainer = namespace["trainer"]
    assert trainer.global_step == 2
    assert "test/f1_macro" in namespace["scores"][0]
    predictions = namespace["predictions"]
    probabilities = torch.cat([batch["probabilities"] for batch in predictions])
    assert probabilities.shape == (139, 6)  # every example of ACL-ARC's test split, every class
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(139))
    assert torch.cat([batch["line"] for batch in predictions]).tolist() == list(range(1, 140))
    assert list(tmp_path.glob("lightning_logs/version_0/task_weights.png"))
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "acl_arc_classifier")
    assert classifier.config.num_labels == 6
    card = (tmp_path / "acl_arc_classifier" / "README.md").read_text()
    assert f"| test/f1_macro | {namespace['scores'][0]['test/f1_macro']:.4f} |" in card


def test_named_configs_exist():
    named = set(re.findall(r"configs/[\w/]+\.yaml", README))
    assert "configs/quickstart.yaml" in named
    assert not {path for path in named if not (REPO / path).is_file()}
    table = "\n".join(line for line in README.splitlines() if line.startswith("|"))
    for name in re.findall(r"`(\w+\.yaml)`", table):  # the methods table names files of configs/methods/
        assert (REPO / "configs" / "methods" / name).is_file(), name
    for task in TASKS:
        assert (REPO / "configs" / "tasks" / f"{task}.yaml").is_file(), task


def test_results_section_is_the_committed_table_and_the_records_recompute_it():
    """The README's results table is docs/results/results.md's, row for row, and runs.json (one record per run)
    recomputes every cell: at least 3 seeds per task and method, 2 tasks, the 6 methods of the grid."""
    results = REPO / "docs" / "results"
    table = [line for line in (results / "results.md").read_text().splitlines() if line.startswith("|")]
    section = README.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    assert table and [line for line in section.splitlines() if line.startswith("|")][: len(table)] == table
    assert "docs/results/results.png" in section and (results / "results.png").is_file()

    records = json.loads((results / "runs.json").read_text())
    scores: dict = {}
    for record in records:
        assert {"task", "method", "seed", "dev_score", "test_score", "encoder", "hardware"} <= set(record)
        scores.setdefault((record["task"], record["method"]), {})[record["seed"]] = record["test_score"]
    methods = ["fine_tuning", "tapt_fine_tuning", "mt_tartan", "meta_tartan"]
    for task in ("citation_intent", "sciie"):
        for method in [*methods, "mt_tartan_posthoc", "meta_tartan_posthoc"]:
            assert len(scores[(task, method)]) >= 3, (task, method)
    for task, cells in json.loads((results / "results.json").read_text())["results"].items():
        for method, cell in cells.items():
            assert cell["mean"] == pytest.approx(statistics.fmean(scores[(task, method)].values()))
            assert cell["n"] == len(scores[(task, method)])


def test_the_recipe_matched_baseline_in_the_results_section_is_the_committed_one():
    """The README's headline comparison quotes docs/results/variants: the end task alone with MT-TARTAN's recipe."""
    section = README.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| end task alone (`mt_recipe_end_task_only`)"))
    results = json.loads((REPO / "docs" / "results" / "variants" / "results.json").read_text())["results"]
    for task in ("citation_intent", "sciie"):
        cell = results[task]["mt_recipe_end_task_only"]
        assert f"{100 * cell['mean']:.1f} ± {100 * cell['sd']:.1f} ({cell['n']})" in row, task
