"""The `tartan` CLI: every shipped config parses to the paper's settings and trains, links reach the model and
callbacks, checkpoints test from the command line, TAPT exports feed fine-tuning, and mistakes fail clearly."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForMaskedLM

from lightning_tartan.callbacks import TaskWeightPlot
from lightning_tartan.cli import tartan_cli
from lightning_tartan.export import ExportEncoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TASKS = ("citation_intent", "sciie", "chemprot", "hyperpartisan")
#: method -> (weighting, auxiliary corpora)
METHODS = {
    "baseline": ("none", []),
    "tapt": ("aux_only", ["tapt"]),
    "dapt": ("aux_only", ["dapt"]),
    "tapt_finetune": ("none", []),
    "dapt_finetune": ("none", []),
    "mt_tartan": ("equal", ["tapt"]),
    "meta_tartan": ("meta", ["tapt"]),
    "mt_tartan_dapt": ("equal", ["tapt", "dapt"]),
    "meta_tartan_dapt": ("meta", ["tapt", "dapt"]),
}
PAPER_CONFIGS = [(task, method) for task in TASKS for method in METHODS]
MONITOR = {"chemprot": "accuracy"}  # the others are scored by macro-F1
SMALL = [
    "--data.max_length=32",
    "--data.batch_size=4",
    "--data.aux_batch_size=4",
    "--data.dev_batch_size=4",
    "--data.eval_batch_size=16",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """In-process runs pass `args`; pytest's own argv would make LightningCLI warn about both being given."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(scope="session")
def hyperpartisan_dir(tmp_path_factory) -> Path:
    """A tiny HyperPartisan folder, including the DAPT corpus its configs ask the user to supply."""
    folder = tmp_path_factory.mktemp("hyperpartisan")
    article = "the senate passed the bill after a long debate about the budget . " * 10
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        rows = [{"text": f"{article} {i}", "label": ["false", "true"][i % 2]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "user_supplied_news_corpus.txt").write_text("a news article about the economy .\n" * 12)
    return folder


@pytest.fixture
def data_dir_for(data_root, hyperpartisan_dir):
    """The real task folder, or the tiny HyperPartisan set (its data is downloaded, not shipped)."""
    return lambda task: hyperpartisan_dir if task == "hyperpartisan" else data_root / task


def config_path(task: str, method: str) -> Path:
    return CONFIGS / task / f"{method}.yaml"


def tartan_script() -> str:
    """The installed console script, next to this interpreter (as in a virtual environment) or on PATH."""
    script = shutil.which("tartan", path=str(Path(sys.executable).parent)) or shutil.which("tartan")
    assert script, "the `tartan` console script is missing: pip install -e ."
    return script


def run_tartan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([tartan_script(), *args], capture_output=True, text=True, env=env, timeout=300)


# ---- shipped configs -------------------------------------------------------------------------------------


def test_every_task_and_method_has_a_config():
    shipped = {path.relative_to(CONFIGS).as_posix() for path in CONFIGS.glob("*/*.yaml")}
    assert shipped == {f"{task}/{method}.yaml" for task, method in PAPER_CONFIGS}


@pytest.mark.parametrize(("task", "method"), PAPER_CONFIGS)
def test_paper_config(task, method, tiny_encoder, data_dir_for, cache_dir, monkeypatch):
    """Parsed and instantiated as `tartan fit --config configs/<task>/<method>.yaml`, from the repository root so
    the shipped data paths resolve; only the encoder is swapped for the tiny one."""
    monkeypatch.chdir(REPO)
    weighting, corpora = METHODS[method]
    overrides = ["--model.encoder_name_or_path", tiny_encoder, "--data.cache_dir", cache_dir]
    if task == "hyperpartisan":
        overrides += ["--data.data_dir", str(data_dir_for(task))]
    cli = tartan_cli(["--config", str(config_path(task, method)), *overrides], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer

    stated_encoder = yaml.safe_load(config_path(task, method).read_text())["model"]["encoder_name_or_path"]
    exported = f"exports/{task}/{method.removesuffix('_finetune')}"
    assert stated_encoder == (exported if method.endswith("_finetune") else "roberta-base")
    hp = model.hparams
    assert (hp.weighting, list(hp.aux_objectives), data.include_meta_dev) == (weighting, corpora, weighting == "meta")
    assert (hp.encoder_lr, hp.head_lr, tuple(hp.adam_betas)) == (1e-4, 1e-3, (0.9, 0.98))
    assert (hp.encoder_weight_decay, hp.head_weight_decay, hp.warmup_ratio) == (0.01, 0.1, 0.06)
    assert (hp.accumulate_grad_batches, hp.meta_lr, hp.dropout) == (2, 1e-2, 0.1)
    assert (data.batch_size, data.aux_batch_size, data.dev_batch_size, data.max_length) == (64, 64, 32, 512)
    assert trainer.accumulate_grad_batches == 1  # TartanModule accumulates itself

    # what the data module knows reaches the model and both default callbacks
    metric = MONITOR.get(task, "f1_macro")
    assert (hp.num_labels, list(hp.label_names)) == (data.num_labels, data.label_names)
    assert hp.tokenizer_name_or_path == data.tokenizer_name_or_path == tiny_encoder
    assert model.monitor_metric == data.monitor_metric == metric
    for callback in (trainer.checkpoint_callback, trainer.early_stopping_callback):
        assert (callback.monitor, callback.mode) == (f"val/{metric}", "max")
    assert trainer.checkpoint_callback.save_last

    if method in ("tapt", "dapt"):
        export = next(callback for callback in trainer.callbacks if isinstance(callback, ExportEncoder))
        assert export.dirpath == Path(f"exports/{task}/{method}")
        assert trainer.max_epochs == 100
    else:  # the paper's schedule: dev evaluation every 30 optimizer steps, patience of 20 evaluations
        assert (trainer.max_epochs, trainer.val_check_interval, trainer.check_val_every_n_epoch) == (150, 60, None)
        assert trainer.early_stopping_callback.patience == 20
    plots = [callback for callback in trainer.callbacks if isinstance(callback, TaskWeightPlot)]
    assert [plot.enabled for plot in plots] == ([True] if weighting == "meta" else [])


@pytest.mark.parametrize(
    ("task", "method"), [*PAPER_CONFIGS, ("quickstart", None)], ids=[*map("/".join, PAPER_CONFIGS), "quickstart"]
)
def test_config_trains(task, method, tiny_encoder, data_dir_for, cache_dir, tmp_path, monkeypatch):
    """`tartan fit --config <config> --trainer.fast_dev_run true` with the tiny encoder: one batch of every
    objective the config trains, one dev batch, and its end-of-fit callbacks."""
    monkeypatch.chdir(tmp_path)  # exports, plots and checkpoints land here
    config = CONFIGS / "quickstart.yaml" if method is None else config_path(task, method)
    data_dir = data_dir_for("citation_intent" if method is None else task)
    cli = tartan_cli(
        ["fit", "--config", str(config), "--model.encoder_name_or_path", tiny_encoder, "--data.data_dir", str(data_dir)]
        + ["--data.cache_dir", cache_dir, "--trainer.fast_dev_run=true", *SMALL]
    )

    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert f"val/{cli.datamodule.monitor_metric}" in metrics
    active = cli.model.weighting.active
    assert all(torch.isfinite(metrics[f"train/loss_{name}"]) for name in active)
    assert list(cli.datamodule.corpora) == (["tapt"] if method is None else METHODS[method][1])
    if cli.model.weighting.needs_dev_gradient:
        assert {f"train/cos_{name}" for name in active} <= set(metrics)
        assert (tmp_path / "task_weights.png").is_file()
    if method in ("tapt", "dapt"):
        assert (tmp_path / "exports" / task / method / "config.json").is_file()


def test_tapt_export_is_the_encoder_of_tapt_finetune(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.data_dir", str(data_root / "citation_intent"), "--data.cache_dir", cache_dir, *SMALL]
    small.append("--trainer.fast_dev_run=true")
    tapt_config = str(config_path("citation_intent", "tapt"))
    tapt = tartan_cli(["fit", "--config", tapt_config, "--model.encoder_name_or_path", tiny_encoder, *small])
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "exports" / "citation_intent" / "tapt")
    trained = tapt.model.encoder.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in exported.base_model.state_dict().items() if k in trained)

    # the fine-tuning config names the folder itself: no encoder override here
    finetune = tartan_cli(["--config", str(config_path("citation_intent", "tapt_finetune")), *small], run=False)
    assert finetune.model.hparams.encoder_name_or_path == "exports/citation_intent/tapt"
    assert finetune.datamodule.tokenizer_name_or_path == "exports/citation_intent/tapt"
    for name, value in finetune.model.encoder.state_dict().items():
        assert torch.equal(value, trained[name]), name
    finetune.trainer.fit(finetune.model, datamodule=finetune.datamodule)
    assert finetune.trainer.global_step == 1


# ---- checkpoints and the console script ------------------------------------------------------------------


def test_test_subcommand_reports_the_checkpoints_metrics(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [
        f"--config={config_path('citation_intent', 'baseline')}",
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}",
        f"--data.cache_dir={cache_dir}",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        *SMALL,
    ]
    fit = tartan_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    best = fit.trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file() and Path(fit.trainer.checkpoint_callback.last_model_path).is_file()
    # as in any Lightning process: after fit, "best" is the checkpoint callback's best
    in_process = fit.trainer.test(datamodule=fit.datamodule, ckpt_path="best", verbose=False)[0]

    result = run_tartan("test", *common, "--ckpt_path", best)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"test/f1_macro\W+([0-9.]+)", result.stdout)
    assert printed, result.stdout[-3000:]
    assert float(printed.group(1)) == pytest.approx(in_process["test/f1_macro"], abs=1e-6)

    predict = tartan_cli([*common, "--trainer.limit_predict_batches=2"], run=False)
    predictions = predict.trainer.predict(predict.model, datamodule=predict.datamodule, ckpt_path=best)
    labels = torch.cat(predictions)
    assert labels.dtype == torch.long and len(labels) == 2 * 16  # limit_predict_batches x --data.eval_batch_size
    assert labels.min() >= 0 and labels.max() < fit.datamodule.num_labels


def test_unknown_option_fails_naming_it():
    result = run_tartan("fit", f"--config={CONFIGS / 'quickstart.yaml'}", "--model.encoder_lrr=0.1")
    assert result.returncode != 0
    assert "--model.encoder_lrr" in result.stderr.splitlines()[-1]


def test_missing_data_dir_fails_naming_it(tiny_encoder, tmp_path):
    missing = tmp_path / "no_such_task"
    result = run_tartan(
        "fit",
        f"--config={CONFIGS / 'quickstart.yaml'}",
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={missing}",
        env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},  # any download fails
    )
    assert result.returncode != 0
    assert f"--data.data_dir {missing}" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ("quickstart.yaml", ["--trainer.accumulate_grad_batches=2"], "set --model.accumulate_grad_batches instead"),
        # fine-tuning before the TAPT run has written its export
        ("sciie/tapt_finetune.yaml", [], "--model.encoder_name_or_path exports/sciie/tapt: no such folder"),
    ],
)
def test_mistakes_fail_before_anything_loads(config, options, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tartan_cli(["fit", "--config", str(CONFIGS / config), *options])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err.splitlines()[-1]
