"""The `tartan` CLI: every shipped config parses to the paper's settings and trains, links reach the model and
callbacks, checkpoints test from the command line, TAPT exports feed fine-tuning, and mistakes fail clearly."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

from datamodules import EndTaskDataModule
from lightning_tartan import CheckpointMismatch, EncoderInputMismatch, PostHocSelection, TartanModule
from lightning_tartan.callbacks import ResumableProgressBar, TaskWeightPlot
from lightning_tartan.cli import tartan_cli
from lightning_tartan.export import ExportEncoder
from lightning_tartan.packing import PACKED

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
    "posthoc": ("none", []),
    "mlm_head_warmup": ("aux_only", ["tapt"]),
}
FINE_TUNING = ("baseline", "tapt_finetune", "dapt_finetune")  # the "Don't Stop Pretraining" classifier recipe
EXPORTS = ("tapt", "dapt", "mlm_head_warmup")  # stage-1 runs that write an encoder for a later run
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
    folder = tmp_path_factory.mktemp("data") / "hyperpartisan"  # its name is the task's, as in exports/{task}/
    folder.mkdir()
    article = "the senate passed the bill after a long debate about the budget . " * 10
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        rows = [{"text": f"{article} {i}", "label": ["false", "true"][i % 2]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "domain.1xTAPT.txt").write_text("a news article about the economy .\n" * 12)
    return folder


@pytest.fixture
def data_dir_for(data_root, hyperpartisan_dir):
    """The real task folder, or the tiny HyperPartisan set (its data is downloaded, not shipped)."""
    return lambda task: hyperpartisan_dir if task == "hyperpartisan" else data_root / task


@pytest.fixture
def multitask_checkpoint(tiny_encoder, data_dir_for, tmp_path):
    """A checkpoint of the tiny encoder with the task's classes: what post-hoc fine-tuning starts from."""

    def make(task: str) -> str:
        num_labels = EndTaskDataModule(data_dir=str(data_dir_for(task))).num_labels
        path = tmp_path / f"{task}_multitask.ckpt"
        torch.save({"state_dict": TartanModule(tiny_encoder, num_labels=num_labels).state_dict()}, path)
        return str(path)

    return make


def config_args(task: str, method: str) -> list[str]:
    """`--config configs/tasks/<task>.yaml --config configs/methods/<method>.yaml`, as the README runs them."""
    task_file, method_file = CONFIGS / "tasks" / f"{task}.yaml", CONFIGS / "methods" / f"{method}.yaml"
    return ["--config", str(task_file), "--config", str(method_file)]


def small_cli(method: str, tiny_encoder: str, cache_dir: str, *options: str):
    """The `tartan` command built (not run) for ACL-ARC with `method`'s config, the tiny encoder and small batches;
    `options` come last, so they override those."""
    args = [*config_args("citation_intent", method), "--model.encoder_name_or_path", tiny_encoder]
    return tartan_cli([*args, "--data.cache_dir", cache_dir, *SMALL, *options], run=False)


def tartan_script() -> str:
    """The installed console script, next to this interpreter (as in a virtual environment) or on PATH."""
    script = shutil.which("tartan", path=str(Path(sys.executable).parent)) or shutil.which("tartan")
    assert script, "the `tartan` console script is missing: pip install -e ."
    return script


def run_tartan(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([tartan_script(), *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


# ---- shipped configs -------------------------------------------------------------------------------------


def test_every_task_and_method_is_one_file():
    """A task is one file and a method is one file; every task x method is the two composed."""
    assert {path.stem for path in (CONFIGS / "tasks").glob("*.yaml")} == set(TASKS)
    assert {path.stem for path in (CONFIGS / "methods").glob("*.yaml")} == set(METHODS)
    assert {path.parent.name for path in CONFIGS.glob("*/*.yaml")} == {"tasks", "methods"}


@pytest.mark.parametrize(("task", "method"), PAPER_CONFIGS)
def test_paper_config(task, method, tiny_encoder, data_dir_for, multitask_checkpoint, cache_dir, monkeypatch):
    """Parsed and instantiated as `tartan fit --config configs/tasks/<task>.yaml --config
    configs/methods/<method>.yaml`, from the repository root so the shipped data paths resolve; only the encoder is
    swapped for the tiny one."""
    monkeypatch.chdir(REPO)
    weighting, corpora = METHODS[method]
    overrides = ["--model.encoder_name_or_path", tiny_encoder, "--data.cache_dir", cache_dir]
    if task == "hyperpartisan":
        overrides += ["--data.data_dir", str(data_dir_for(task))]
    if method == "posthoc":
        overrides += ["--model.init_checkpoint", multitask_checkpoint(task)]
    cli = tartan_cli([*config_args(task, method), *overrides], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer

    stated = yaml.safe_load((CONFIGS / "methods" / f"{method}.yaml").read_text())["model"]["encoder_name_or_path"]
    stated_encoder = stated.replace("{task}", task)
    expected_encoder = {
        "tapt_finetune": f"exports/{task}/tapt",
        "dapt_finetune": f"exports/{task}/dapt",
        "mlm_head_warmup": "sentence-transformers/all-MiniLM-L6-v2",  # an encoder that ships without an MLM head
    }
    assert stated_encoder == expected_encoder.get(method, "roberta-base")
    hp = model.hparams
    assert (hp.weighting, list(hp.aux_objectives), data.include_meta_dev) == (weighting, corpora, weighting == "meta")
    assert (tuple(hp.adam_betas), hp.dropout, data.max_length, hp.max_grad_norm) == ((0.9, 0.98), 0.1, 512, 1.0)
    assert hp.freeze_encoder == (method == "mlm_head_warmup")
    early_stopping = trainer.early_stopping_callback
    if method in FINE_TUNING:  # "Don't Stop Pretraining": ROBERTA_CLASSIFIER_SMALL
        assert (hp.encoder_lr, hp.head_lr, hp.encoder_weight_decay, hp.head_weight_decay) == (2e-5, 2e-5, 0.1, 0.1)
        assert (hp.lr_schedule, hp.warmup_ratio, hp.adam_eps, hp.accumulate_grad_batches) == ("constant", 0, 1e-6, 1)
        assert data.batch_size == 16
        assert (trainer.max_epochs, trainer.check_val_every_n_epoch, early_stopping.patience) == (10, 1, 3)
    elif method == "posthoc":  # the authors' finetune_primary_task
        assert (hp.encoder_lr, hp.head_lr, hp.encoder_weight_decay, hp.head_weight_decay) == (5e-6, 5e-6, 0.01, 0.01)
        assert (hp.lr_schedule, hp.warmup_ratio, hp.adam_eps, hp.accumulate_grad_batches) == ("constant", 0, 1e-8, 2)
        assert data.batch_size == 64
        assert (trainer.max_epochs, trainer.check_val_every_n_epoch, early_stopping.patience) == (10, 1, 3)
        assert [type(c) for c in trainer.callbacks if isinstance(c, PostHocSelection)] == [PostHocSelection]
    else:  # TARTAN's multitask settings (and TAPT/DAPT's, which share them)
        encoder_lr = 1e-3 if method == "mlm_head_warmup" else 1e-4  # only the MLM head trains there
        assert (hp.encoder_lr, hp.head_lr, hp.encoder_weight_decay, hp.head_weight_decay) == (encoder_lr, 1e-3, 0.01, 0.1)
        assert (hp.lr_schedule, hp.warmup_ratio, hp.adam_eps, hp.accumulate_grad_batches) == ("linear", 0.06, 1e-6, 2)
        assert (hp.meta_lr, hp.dev_gradient) == (1e-2, "held_out")
        assert (data.batch_size, data.aux_batch_size, data.dev_batch_size, data.dev_grad_batch_size) == (64, 64, 32, 64)
    assert trainer.accumulate_grad_batches == 1  # TartanModule accumulates itself

    # what the data module knows reaches the model and both default callbacks
    metric = MONITOR.get(task, "f1_macro")
    assert (hp.num_labels, list(hp.label_names)) == (data.num_labels, data.label_names)
    assert hp.tokenizer_name_or_path == data.tokenizer_name_or_path == tiny_encoder
    assert model.monitor_metric == data.monitor_metric == metric
    assert data.accumulate_grad_batches == hp.accumulate_grad_batches  # a training batch is one optimizer step
    for callback in (trainer.checkpoint_callback, early_stopping):
        assert (callback.monitor, callback.mode) == (f"val/{metric}", "max")
    assert trainer.checkpoint_callback.keep_last  # last.ckpt: always the latest state

    if method in EXPORTS:
        export = next(callback for callback in trainer.callbacks if isinstance(callback, ExportEncoder))
        assert export.dirpath == Path(f"exports/{task}/{method}")
        assert (trainer.max_epochs, trainer.max_steps) == ((100, -1) if method != "mlm_head_warmup" else (None, 300))
    elif method not in (*FINE_TUNING, "posthoc"):  # the paper's schedule: a dev evaluation every 30 optimizer steps
        assert (trainer.max_epochs, trainer.val_check_interval, trainer.check_val_every_n_epoch) == (150, 30, None)
        assert early_stopping.patience == 20
    plots = [callback for callback in trainer.callbacks if isinstance(callback, TaskWeightPlot)]
    assert [plot.enabled for plot in plots] == ([True] if weighting == "meta" else [])


@pytest.mark.parametrize(
    ("task", "method"), [*PAPER_CONFIGS, ("quickstart", None)], ids=[*map("/".join, PAPER_CONFIGS), "quickstart"]
)
def test_config_trains(task, method, tiny_encoder, data_dir_for, multitask_checkpoint, cache_dir, tmp_path, monkeypatch):
    """`tartan fit --config <config> --trainer.fast_dev_run true` with the tiny encoder: one batch of every
    objective the config trains, one dev batch, and its end-of-fit callbacks."""
    monkeypatch.chdir(tmp_path)  # exports, plots and checkpoints land here
    config = ["--config", str(CONFIGS / "quickstart.yaml")] if method is None else config_args(task, method)
    data_dir = data_dir_for("citation_intent" if method is None else task)
    start = ["--model.init_checkpoint", multitask_checkpoint(task)] if method == "posthoc" else []
    cli = tartan_cli(
        ["fit", *config, "--model.encoder_name_or_path", tiny_encoder, "--data.data_dir", str(data_dir)]
        + ["--data.cache_dir", cache_dir, "--trainer.fast_dev_run=true", *SMALL, *start]
    )

    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert f"val/{cli.datamodule.monitor_metric}" in metrics
    active = cli.model.weighting.active
    assert all(torch.isfinite(metrics[f"train/loss_{name}"]) for name in active)
    assert list(cli.datamodule.corpora) == (["tapt"] if method is None else METHODS[method][1])
    if cli.model.weighting.needs_dev_samples:
        assert {f"train/cos_{name}" for name in active} <= set(metrics)
        assert (tmp_path / "task_weights.png").is_file()
    if method in EXPORTS:
        assert (tmp_path / "exports" / task / method / "config.json").is_file()
    if method == "posthoc":
        assert (tmp_path / "posthoc_selection.json").is_file()


@pytest.mark.parametrize("method", ["tapt", "mlm_head_warmup"])
def test_a_stage_shorter_than_an_epoch_exports(method, tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """`max_steps` reached before the first dev evaluation (a TAPT corpus bigger than the step budget): early
    stopping has no dev metric yet, which must not stop the stage from finishing and writing its export."""
    monkeypatch.chdir(tmp_path)
    cli = tartan_cli(
        ["fit", *config_args("citation_intent", method), "--model.encoder_name_or_path", tiny_encoder]
        + ["--data.data_dir", str(data_root / "citation_intent"), "--data.cache_dir", cache_dir, *SMALL]
        + ["--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert (tmp_path / "exports" / "citation_intent" / method / "config.json").is_file()


def test_tapt_export_is_the_encoder_of_tapt_finetune(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.data_dir", str(data_root / "citation_intent"), "--data.cache_dir", cache_dir, *SMALL]
    small.append("--trainer.fast_dev_run=true")
    tapt_config = config_args("citation_intent", "tapt")
    tapt = tartan_cli(["fit", *tapt_config, "--model.encoder_name_or_path", tiny_encoder, *small])
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "exports" / "citation_intent" / "tapt")
    trained = tapt.model.encoder.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in exported.base_model.state_dict().items() if k in trained)

    # the fine-tuning config names the folder itself: no encoder override here
    finetune = tartan_cli([*config_args("citation_intent", "tapt_finetune"), *small], run=False)
    assert finetune.model.hparams.encoder_name_or_path == "exports/citation_intent/tapt"
    assert finetune.datamodule.tokenizer_name_or_path == "exports/citation_intent/tapt"
    for name, value in finetune.model.encoder.state_dict().items():
        assert torch.equal(value, trained[name]), name
    finetune.trainer.fit(finetune.model, datamodule=finetune.datamodule)
    assert finetune.trainer.global_step == 1


def test_seed_everything_drives_data_order_and_dev_samples(tiny_encoder, data_root, cache_dir, monkeypatch):
    """`--seed_everything` changes what each source serves, not only dropout and initialisation."""
    monkeypatch.chdir(REPO)
    orders = {}
    for seed in (1, 2):
        cli = small_cli("meta_tartan", tiny_encoder, cache_dir, "--seed_everything", str(seed))
        cli.datamodule.setup("fit")
        assert cli.datamodule.run_seed == seed
        orders[seed] = {name: list(dl.sampler)[:32] for name, dl in cli.datamodule.train_dataloader().iterables.items()}
    assert set(orders[1]) == {"end_task", "tapt", "meta_dev", "meta_dev_grad"}
    assert all(orders[1][name] != orders[2][name] for name in orders[1])


def test_group_by_length_from_the_command_line(tiny_encoder, cache_dir, monkeypatch):
    """`--data.init_args.group_by_length true` reaches the data module, whose training sources then group by length."""
    monkeypatch.chdir(REPO)
    cli = small_cli("mt_tartan", tiny_encoder, cache_dir, "--data.init_args.group_by_length", "true")
    assert cli.datamodule.group_by_length is True
    cli.datamodule.setup("fit")
    loaders = cli.datamodule.train_dataloader().iterables
    assert all(loaders[name].sampler.grouping is not None for name in ("end_task", "tapt"))


def test_gradient_checkpointing_from_the_command_line(tiny_encoder, cache_dir, monkeypatch):
    """`--model.gradient_checkpointing true`, as the README gives it, checkpoints every encoder layer."""
    monkeypatch.chdir(REPO)
    cli = small_cli("meta_tartan", tiny_encoder, cache_dir, "--model.gradient_checkpointing", "true")
    assert all(layer.gradient_checkpointing for layer in cli.model.encoder.encoder.layer)


def test_pack_sequences_from_the_command_line(tiny_encoder, cache_dir, tmp_path, monkeypatch):
    """`--model.pack_sequences true`: META-TARTAN trains on ACL-ARC with every micro-batch of every source packed."""
    monkeypatch.chdir(REPO)
    cli = small_cli(
        "meta_tartan", tiny_encoder, cache_dir, "--model.pack_sequences", "true", "--data.max_length=128",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}",
    )
    cli.datamodule.setup("fit")
    batch = cli.model.on_before_batch_transfer(next(iter(cli.datamodule.train_dataloader()))[0], 0)
    packed = {name for name, micro_batches in batch.items() if all(PACKED in part for part in micro_batches)}
    assert packed == {"end_task", "tapt", "meta_dev", "meta_dev_grad"}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    scores = cli.trainer.validate(cli.model, datamodule=cli.datamodule)[0]  # dev batches are packed too
    assert 0 <= scores["val/f1_macro"] <= 1


def test_posthoc_stage_from_the_command_line(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """META-TARTAN, then post-hoc fine-tuning of its best checkpoint, then `tartan test` of the model chosen."""
    monkeypatch.chdir(tmp_path)
    common = [f"--model.encoder_name_or_path={tiny_encoder}", f"--data.data_dir={data_root / 'citation_intent'}"]
    common += [f"--data.cache_dir={cache_dir}", "--trainer.limit_val_batches=2", *SMALL]
    meta = tartan_cli(
        ["fit", *config_args("citation_intent", "meta_tartan"), *common]
        + ["--trainer.max_steps=4", "--trainer.val_check_interval=4"]
    )
    best = meta.trainer.checkpoint_callback.best_model_path
    posthoc = tartan_cli(
        ["fit", *config_args("citation_intent", "posthoc"), *common, "--model.init_checkpoint", best]
        + ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4"]
    )
    log_dir = Path(posthoc.trainer.log_dir)
    selection = json.loads((log_dir / "posthoc_selection.json").read_text())
    metric = "val/f1_macro"
    scores = [float(row[metric]) for row in csv.DictReader((log_dir / "metrics.csv").open()) if row.get(metric)]
    assert len(scores) == 3  # the starting model, then one dev evaluation per epoch
    assert selection["start_score"] == pytest.approx(scores[0])
    assert selection["start_score"] == pytest.approx(float(meta.trainer.checkpoint_callback.best_model_score))
    assert selection["fine_tuned_score"] == pytest.approx(max(scores[1:]))
    assert selection["selected"] == ("fine_tuned" if max(scores[1:]) > scores[0] else "start")

    result = run_tartan("test", "--config", str(log_dir / "config.yaml"), "--ckpt_path", selection["selected_checkpoint"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test/f1_macro\W+[0-9.]+", result.stdout), result.stdout[-3000:]


# ---- checkpoints and the console script ------------------------------------------------------------------


def acl_arc_baseline(tiny_encoder: str, data_root: Path, cache_dir: str) -> list[str]:
    """`tartan` options of a small ACL-ARC fine-tuning run with the tiny encoder."""
    return [
        *config_args("citation_intent", "baseline"),
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}",
        f"--data.cache_dir={cache_dir}",
        *SMALL,
    ]


def test_test_subcommand_reports_the_checkpoints_metrics(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    limits = ["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]
    common = [*acl_arc_baseline(tiny_encoder, data_root, cache_dir), *limits]
    fit = tartan_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    best = fit.trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file() and Path(fit.trainer.checkpoint_callback.last_model_path).is_file()
    # as in any Lightning process: after fit, "best" is the checkpoint callback's best
    in_process = fit.trainer.test(datamodule=fit.datamodule, ckpt_path="best", verbose=False)[0]

    result = run_tartan("test", *common, "--ckpt_path", best)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # the new run's checkpoint folder is not news
    printed = re.search(r"test/f1_macro\W+([0-9.]+)", result.stdout)
    assert printed, result.stdout[-3000:]
    assert float(printed.group(1)) == pytest.approx(in_process["test/f1_macro"], abs=1e-6)
    # as the README tests it: the run's own config.yaml, and the best checkpoint its last.ckpt records
    run_config = Path(fit.trainer.log_dir) / "config.yaml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_name = tartan_cli(["test", f"--config={run_config}", "--ckpt_path=best", *limits])
    assert by_name.trainer.ckpt_path == best
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # this run's folder is a new one
    assert by_name.trainer.callback_metrics["test/f1_macro"] == pytest.approx(in_process["test/f1_macro"], abs=1e-6)

    # `tartan predict` labels the test split into the run's folder: every example once, in file order, with the
    # checkpoint's predictions (on the tested examples, as accurate as `tartan test` said)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # as in a new shell: the fit above set it in this process
    result = run_tartan("predict", *common, "--ckpt_path", best)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # nothing the user could act on
    assert "No seed found" not in result.stderr and "Seed set to 0" in result.stderr  # tartan's default seed
    written = sorted(tmp_path.glob("lightning_logs/version_*/predictions.jsonl"))
    assert len(written) == 1 and f"Wrote 139 predictions to {written[0]}" in result.stdout + result.stderr
    rows = [json.loads(line) for line in written[0].read_text().splitlines()]
    test_file = data_root / "citation_intent" / "test.jsonl"
    examples = [json.loads(line) for line in test_file.read_text().splitlines()]
    assert [row["line"] for row in rows] == list(range(1, len(examples) + 1))
    assert [row["gold"] for row in rows] == [example["label"] for example in examples]
    for row in rows:
        assert list(row["probabilities"]) == fit.datamodule.label_names
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    tested = rows[: 2 * 16]  # --trainer.limit_test_batches x --data.eval_batch_size
    accuracy = sum(row["label"] == row["gold"] for row in tested) / len(tested)
    assert accuracy == pytest.approx(in_process["test/accuracy"], abs=1e-6)


def test_a_users_own_task_with_integer_labels_trains_from_the_shipped_config(tiny_encoder, cache_dir, tmp_path):
    """configs/own_task.yaml on a folder of the user's (integer labels, no TAPT file): META-TARTAN trains on the
    end task and the MLM objective over the training texts, and tests and predicts with the numbers as names."""
    task = tmp_path / "my_task"
    task.mkdir()
    words = ["good", "bad", "fine", "poor", "great", "awful"]
    for split, size in (("train", 24), ("dev", 8), ("test", 8)):
        rows = [{"text": f"a {words[i % 6]} review number {i}", "label": i % 3} for i in range(size)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [
        f"--config={CONFIGS / 'own_task.yaml'}",
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={task}",
        f"--data.cache_dir={cache_dir}",
        f"--trainer.default_root_dir={tmp_path}",
        *SMALL,
    ]
    fit = tartan_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert fit.model.hparams.label_names == ["0", "1", "2"] and fit.model.objectives == ["end_task", "tapt"]
    assert fit.trainer.global_step == 2 and sorted(fit.model.weighting.weights()) == ["end_task", "tapt"]
    best = fit.trainer.checkpoint_callback.best_model_path
    result = run_tartan("predict", *common, "--ckpt_path", best)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in next(tmp_path.glob("lightning_logs/*/predictions.jsonl")).open()]
    assert [row["gold"] for row in rows] == [str(i % 3) for i in range(8)]

    # elsewhere, without the training data: the run's config and checkpoint label new texts by the model's classes
    task.rename(tmp_path / "archived")
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    (elsewhere / "new.txt").write_text("a great review\na poor one\n")
    run_config = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    result = run_tartan(
        "predict", f"--config={run_config}", "--ckpt_path=best", "--data.predict_file=new.txt",
        "--predictions.output_file=labels.jsonl", cwd=elsewhere,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (elsewhere / "labels.jsonl").open()]
    assert [row["line"] for row in rows] == [1, 2]
    assert all(list(row["probabilities"]) == ["0", "1", "2"] for row in rows)


def test_checkpoints_of_another_task_or_method_are_refused_in_one_line(
    tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch
):
    """`--ckpt_path last` after runs of other methods does not resume one of them, and a checkpoint of a task with
    other classes is not silently scored under this task's label names: one line each, exit status 2."""
    monkeypatch.chdir(tmp_path)
    common = [*acl_arc_baseline(tiny_encoder, data_root, cache_dir), "--trainer.limit_val_batches=1"]
    fit = tartan_cli(["fit", *common, "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    best = fit.trainer.checkpoint_callback.best_model_path

    result = run_tartan("fit", *common, "--model.weighting=equal", "--trainer.max_steps=2", "--ckpt_path=last")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--ckpt_path last: no earlier run of this task and method" in last
    assert "model.weighting: none, not equal" in last

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for split in ("train", "dev", "test"):  # "Background" sorts last as "ZBackground": every class id moves
        text = (data_root / "citation_intent" / f"{split}.jsonl").read_text()
        (renamed / f"{split}.jsonl").write_text(text.replace('"Background"', '"ZBackground"'))
    result = run_tartan("test", *common, f"--data.data_dir={renamed}", "--ckpt_path", best)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"tartan: error: {re.escape(str(renamed))}/test.jsonl:\d+: label 'ZBackground' is not one of the "
                    r"model's classes \['Background', ", last), last
    # the renamed data's own classes, named: the checkpoint's do not replace them, and it is refused
    renamed_classes = json.dumps([*fit.datamodule.label_names[1:], "ZBackground"])
    with pytest.raises(CheckpointMismatch, match="the checkpoint was made with label_names=.*ZBackground"):
        tartan_cli(["test", *common, f"--data.data_dir={renamed}", "--ckpt_path", best,
                    f"--data.init_args.label_names={renamed_classes}"])
    # the failed commands left no run folder behind (the second had written its config.yaml)
    assert [folder.name for folder in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


def test_ckpt_path_last_from_the_working_directory_keeps_the_best_dev_score(
    tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch
):
    """As the README runs it: no --trainer.default_root_dir, logs under ./lightning_logs. The resumed run's
    checkpoint callback knows the first run's best dev score (else a worse score would become "best")."""
    monkeypatch.chdir(tmp_path)
    common = [*acl_arc_baseline(tiny_encoder, data_root, cache_dir), "--trainer.limit_val_batches=2"]
    first = tartan_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    best = first.trainer.checkpoint_callback.best_model_score
    assert best is not None
    resumed = tartan_cli(
        ["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--ckpt_path=last"]
    )
    assert resumed.trainer.checkpoint_callback.best_model_score == best
    # how the steps run is the resuming command's to say, given a checkpoint file too (LightningCLI would build the
    # model with the checkpoint's options)
    last = resumed.trainer.checkpoint_callback.last_checkpoint_path
    faster = tartan_cli(["fit", *common, "--trainer.max_steps=2", f"--ckpt_path={last}",
                         "--model.gradient_checkpointing=true", "--model.fused_optimizer=false"])
    assert faster.model.hparams.gradient_checkpointing and faster.model.hparams.fused_optimizer is False


def test_a_moved_run_folder_resumes_with_its_best_dev_score_and_tests_its_best_checkpoint(
    tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch
):
    """A run folder moved (or copied to another machine) before it resumes: its checkpoints record the old paths."""
    common = [*acl_arc_baseline(tiny_encoder, data_root, cache_dir), "--trainer.limit_val_batches=2"]
    steps = ["--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    first = tartan_cli(["fit", *common, *steps]).trainer.checkpoint_callback
    best = Path(first.best_model_path).name
    # a copy tests its own checkpoint, not the one in the folder it was copied from (retrained since, say)
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    tested = tartan_cli(["test", "--config", "lightning_logs/version_0/config.yaml", "--ckpt_path=best"])
    assert Path(tested.trainer.ckpt_path).resolve().is_relative_to(tmp_path / "copy")
    shutil.move(tmp_path / "first", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")  # Lightning's: the best would be lost
        resumed = tartan_cli(["fit", *common, *steps, "--ckpt_path=last"]).trainer.checkpoint_callback
    assert resumed.best_model_score == first.best_model_score
    moved_best = tmp_path / "moved" / "lightning_logs" / "version_0" / "checkpoints" / best
    assert Path(resumed.best_model_path).resolve() == moved_best
    tested = tartan_cli(["test", "--config", "lightning_logs/version_0/config.yaml", "--ckpt_path=best"])
    assert Path(tested.trainer.ckpt_path).resolve() == moved_best
    assert not (tmp_path / "first").exists()  # its config.yaml names the old folder; the logs go beside the run


@pytest.mark.long
def test_predict_labels_a_users_own_file(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """`--data.predict_file` labels texts of the user's own, a `.txt` (one per line) or JSON lines without labels,
    into `--predictions.output_file`; a bad line is one error naming the file and line."""
    monkeypatch.chdir(tmp_path)
    common = acl_arc_baseline(tiny_encoder, data_root, cache_dir)
    fit = tartan_cli(
        ["fit", *common, "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1"]
    )
    best = fit.trainer.checkpoint_callback.best_model_path
    (tmp_path / "mine.txt").write_text("We follow the method of Smith et al.\n\nUnlike Lee ( 2003 ) , we parse.\n")
    (tmp_path / "mine.jsonl").write_text('{"text": "a"}\n{"id": 7, "text": "b"}\n')
    for source, lines in (("mine.txt", [1, 3]), ("mine.jsonl", [1, 2])):
        out = tmp_path / f"{source}.predictions.jsonl"
        result = run_tartan(
            "predict", *common, "--ckpt_path", best,
            f"--data.predict_file={tmp_path / source}", f"--predictions.output_file={out}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["line"] for row in rows] == lines
        if source == "mine.txt":  # what is not labeled is said
            assert "mine.txt: 1 blank line (line 2) skipped, not labeled" in result.stdout + result.stderr
        assert all(row["label"] in fit.datamodule.label_names and "gold" not in row for row in rows)

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    result = run_tartan("predict", *common, "--ckpt_path", best, f"--data.predict_file={tmp_path / 'bad.jsonl'}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tartan: error: {tmp_path / 'bad.jsonl'}:2: no 'text' field")  # then the fields it has


@pytest.mark.long
@pytest.mark.parametrize(
    "length, stop_at, stop",
    [
        (["--trainer.max_steps=8"], 5, "SIGINT"),
        # a cluster's pre-emption, in a run with a checkpoint callback of the user's own beside tartan's
        (["--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.callbacks+=ModelCheckpoint",
          "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.filename=loss-{step}"], 2, "SIGTERM"),
    ],
    ids=["max_steps-ctrl_c", "max_epochs-sigterm"],
)
def test_ctrl_c_or_sigterm_then_ckpt_path_last_finishes_like_an_uninterrupted_run(
    tiny_encoder, data_root, cache_dir, tmp_path, length, stop_at, stop
):
    """Ctrl-C (or SIGTERM) mid-epoch and mid dev-interval (optimizer step 5 of 8, or step 2 of an epoch of 4 where
    the run is two epochs long, as the shipped trainer configs count it), then the same command with `--ckpt_path
    last`: the steps, epoch, weights, task weights and best dev score at the end are those of a run never
    interrupted."""
    command = [
        "fit",
        *config_args("citation_intent", "meta_tartan"),
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}",
        f"--data.cache_dir={cache_dir}",
        "--model.dropout=0.1",
        *length,
        "--trainer.val_check_interval=3",  # dev evaluations after optimizer steps 3 and 6
        "--trainer.limit_val_batches=2",
        "--seed_everything=3",
        *SMALL,
    ]
    env = {"PYTHONPATH": str(Path(__file__).parent)}  # tests/interrupt.py

    def run(folder: Path, *extra: str, exit_status: int = 0) -> subprocess.CompletedProcess:
        result = run_tartan(*command, f"--trainer.default_root_dir={folder}", *extra, env=env)
        assert result.returncode == exit_status, result.stderr[-3000:]
        return result

    uninterrupted = run(tmp_path / "uninterrupted")
    # what a user could act on, not Lightning's notes on how the module is built (cli.QUIET_WARNINGS)
    assert "on_before_batch_transfer" not in uninterrupted.stderr and "LeafSpec" not in uninterrupted.stderr
    interrupted = run(  # exits as an interrupted command does, so `tartan fit ... && tartan test ...` stops there
        tmp_path / "resumed", "--trainer.callbacks+=interrupt.InterruptAtStep", f"--trainer.callbacks.step={stop_at}",
        f"--trainer.callbacks.signal_name={stop}", exit_status=128 + signal.Signals[stop],
    )
    said = "Ctrl-C" if stop == "SIGINT" else stop
    assert f"{said}: stopping at the end of this optimizer step" in interrupted.stderr + interrupted.stdout
    assert f"Stopped after optimizer step {stop_at} ({stop}): resume with" in interrupted.stderr + interrupted.stdout
    last = tmp_path / "resumed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop_at
    resumed = run(tmp_path / "resumed", "--ckpt_path=last")
    assert "Resuming from" in resumed.stderr + resumed.stdout
    assert "exists and is not empty" not in resumed.stderr  # Lightning's warning: writing on there is the point

    expected = torch.load(next((tmp_path / "uninterrupted").rglob("last.ckpt")), weights_only=True)
    actual = torch.load(last, weights_only=True)  # the resumed run kept writing to the interrupted run's folder
    assert actual["global_step"] == expected["global_step"] == 8
    assert actual["epoch"] == expected["epoch"]
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], value, rtol=0, atol=0, msg=name)
    best = [state["best_model_score"] for key, state in expected["callbacks"].items() if "Resumable" in key]
    assert best == [state["best_model_score"] for key, state in actual["callbacks"].items() if "Resumable" in key]


@pytest.mark.long
@pytest.mark.parametrize("epoch", [[], ["--trainer.limit_train_batches=4"]], ids=["mid-epoch", "at-epoch-end"])
def test_a_finished_run_extended_with_more_max_steps_goes_on_where_it_stopped(epoch, tiny_encoder, data_root,
                                                                              cache_dir, tmp_path):
    """`--ckpt_path last` with a larger `max_steps` after a run that `max_steps` ended, mid-epoch or on an epoch's
    last batch: training goes on as in one run of the larger budget (a constant learning rate, so the schedule is
    the same)."""
    command = [
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}",
        "--model.lr_schedule=constant", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--seed_everything=4", *SMALL, *epoch,
    ]
    for folder, steps, extra in (("whole", 6, []), ("extended", 4, []), ("extended", 6, ["--ckpt_path=last"])):
        result = run_tartan(*command, f"--trainer.default_root_dir={tmp_path / folder}", f"--trainer.max_steps={steps}",
                            *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    whole, extended = (torch.load(next((tmp_path / name).rglob("last.ckpt")), weights_only=True)
                       for name in ("whole", "extended"))
    assert (extended["epoch"], extended["global_step"]) == (whole["epoch"], whole["global_step"])
    assert (whole["epoch"], whole["global_step"]) == ((1, 6) if epoch else (0, 6))
    for name, value in whole["state_dict"].items():
        torch.testing.assert_close(extended["state_dict"][name], value, rtol=0, atol=0, msg=name)


def test_a_weighting_strategy_of_ones_own_from_the_command_line(tiny_encoder, data_root, cache_dir, tmp_path):
    """`--model.weighting <import path>`, as the README shows it: the run trains with those weights and logs them."""
    cli = tartan_cli(
        ["fit", *config_args("citation_intent", "mt_tartan"), f"--model.encoder_name_or_path={tiny_encoder}"]
        + [f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}", *SMALL]
        + ["--model.weighting=own_weighting.EndTaskHeavy", "--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
        + [f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.logged_metrics["train/weight_end_task"] == 0.5 == cli.trainer.logged_metrics["train/weight_tapt"]
    assert type(cli.model.weighting).__name__ == "EndTaskHeavy"


def test_runs_log_to_csv_unless_told_otherwise(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """metrics.csv in every run folder, whether or not tensorboard is installed (Lightning would switch to it)."""
    monkeypatch.chdir(tmp_path)
    cli = tartan_cli(
        [*config_args("citation_intent", "baseline"), f"--model.encoder_name_or_path={tiny_encoder}"]
        + [f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}"],
        run=False,
    )
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert Path(cli.trainer.logger.log_dir).resolve().parent == tmp_path.resolve() / "lightning_logs"
    assert cli.trainer.log_every_n_steps == 1  # every optimizer step's losses, as the README says (Lightning: 50)


def test_logs_and_progress_count_optimizer_steps(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """The quickstart (two micro-batches per optimizer step): metrics.csv has one row of losses and task weights per
    optimizer step, against the step, its learning rates in the same row; the progress bar counts the run's
    optimizer steps and shows the losses."""
    monkeypatch.chdir(tmp_path)
    cli = tartan_cli(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"), f"--model.encoder_name_or_path={tiny_encoder}"]
        + [f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}", "--data.max_length=32"]
        + ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]
    )
    trainer = cli.trainer
    assert trainer.global_step == 6 and cli.model.hparams.accumulate_grad_batches == 2
    bar = trainer.progress_bar_callback
    assert type(bar) is ResumableProgressBar and (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    assert {"train/loss_end_task", "train/loss_tapt"} <= set(bar.get_metrics(trainer, cli.model))
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    weight_steps = [int(row["step"]) for row in rows if row["train/weight_tapt"]]
    assert weight_steps == list(range(6))
    assert [int(row["step"]) for row in rows if row["train/loss_end_task"]] == weight_steps
    assert [int(row["step"]) for row in rows if row["train/lr/encoder"] and row["train/lr/head"]] == weight_steps
    assert all(row["train/loss_end_task"] for row in rows if row["train/lr/encoder"])  # one row per step
    assert [int(row["step"]) for row in rows if row["val/f1_macro"]] == [2, 5]  # after optimizer steps 3 and 6
    # checkpoint names count the same optimizer steps
    assert Path(trainer.checkpoint_callback.best_model_path).name in ("epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt")


def test_last_checkpoint_is_the_final_state(tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch):
    """Lightning's own `last.ckpt` stops at the last improvement; ours holds the last step of the run."""
    monkeypatch.chdir(tmp_path)
    cli = tartan_cli(
        ["fit", *config_args("citation_intent", "baseline"), f"--model.encoder_name_or_path={tiny_encoder}"]
        + [f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}", *SMALL]
        + ["--trainer.max_steps=5", "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null"]
        + ["--trainer.limit_val_batches=2", "--model.encoder_lr=1e-9", "--model.head_lr=1e-9"]  # no improvement after the first
    )
    assert torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["global_step"] == 5


def test_ckpt_path_last_without_a_checkpoint_fails_instead_of_starting_over(tiny_encoder, tmp_path):
    result = run_tartan(
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}",
        f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last",
    )
    assert result.returncode == 2
    assert f"--ckpt_path last: no checkpoint at {tmp_path}" in result.stderr.splitlines()[-1]


def test_unreachable_hub_name_is_one_line(tmp_path):
    result = run_tartan("fit", f"--config={CONFIGS / 'quickstart.yaml'}", "--model.encoder_name_or_path=nobody/no-such-encoder")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert "--model.encoder_name_or_path nobody/no-such-encoder: neither a local folder nor reachable" in last_line


def test_a_callback_monitoring_a_dev_metric_the_model_does_not_log_is_refused_before_training(tiny_encoder, tmp_path):
    """Lightning would report it at the first dev evaluation, after training up to it."""
    result = run_tartan(
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=val/f1",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: ModelCheckpoint(monitor='val/f1') in --trainer.callbacks: the model logs no such key (did you mean "
        "val/f1_macro?); its dev metrics are val/f1_macro, val/accuracy, val/loss"
    )


def test_bad_data_file_is_one_line_naming_file_and_line(tiny_encoder, data_root, tmp_path):
    folder = tmp_path / "task"
    shutil.copytree(data_root / "citation_intent", folder, ignore=shutil.ignore_patterns("*.txt"))
    lines = (folder / "dev.jsonl").read_text().splitlines()
    lines[6] = '{"text": "broken", "label": '
    (folder / "dev.jsonl").write_text("\n".join(lines) + "\n")
    result = run_tartan(
        "fit", *config_args("citation_intent", "baseline"), f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={folder}", f"--trainer.default_root_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"tartan: error: {folder / 'dev.jsonl'}:7: malformed JSON")
    assert not list(tmp_path.glob("lightning_logs/version_*"))  # the next run is version_0, as the README says


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--data.batch_size=0", "`batch_size` must be >= 1, got 0"),
        ("--model.encoder_lr=0", "encoder_lr must be > 0"),
        ("--model.attn_implementation=flash_attention_2", "attn_implementation='flash_attention_2' for "),
        ("--trainer.gradient_clip_val=1.0", "TartanModule optimizes manually and clips its gradients itself: set "
                                            "--model.max_grad_norm instead"),
    ],
)
def test_bad_option_value_is_one_line_naming_it(tiny_encoder, data_root, tmp_path, option, message):
    result = run_tartan(
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}", f"--trainer.default_root_dir={tmp_path}", option,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: {message}")
    assert "Namespace(" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--model.encoder_lrr=0.1", "--trainer.max_step=3"], ids=["typo", "abbreviation"])
def test_unknown_option_fails_naming_it(option):
    """A misspelt option is an error, a shortened one too (argparse would take `max_step` for `max_steps`)."""
    result = run_tartan("fit", f"--config={CONFIGS / 'quickstart.yaml'}", option)
    assert result.returncode != 0
    assert option.split("=")[0] in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--trainer.max_step=3", "--model.encoder_lrr=0.1"],
         "unrecognized arguments: --trainer.max_step=3 --model.encoder_lrr=0.1 (did you mean --trainer.max_steps, "
         "--model.encoder_lr?)"),
        (["--data.max_lenght=32"],
         "--data.max_lenght: CitationIntentDataModule has no such option (did you mean --data.max_length?)"),
        (["--data.class_path=datamodules.CitationIntentDatamodule"],
         "--data.class_path: datamodules has no 'CitationIntentDatamodule' (did you mean "
         "datamodules.CitationIntentDataModule?)"),
    ],
    ids=["options", "data option", "data class"],
)
def test_a_misspelt_option_is_three_lines_naming_the_nearest(options, message, capsys):
    """Not the usage of a hundred options, nor jsonargparse's union-type report: the option meant, in a line."""
    with pytest.raises(SystemExit) as exit_info:
        tartan_cli(["fit", f"--config={CONFIGS / 'quickstart.yaml'}", *options])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err == ["usage: tartan fit [--config CONFIG] [options]",
                   "tip: For details of accepted options run: tartan fit --help", f"error: {message}"]


def test_a_config_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys):
    """With a task and a method config, "<unicode string>, line 8" would not say which file is broken."""
    broken = tmp_path / "method.yaml"
    broken.write_text("model:\n  weighting: meta\n  encoder_lr: 1e-4: 2\n")
    with pytest.raises(SystemExit):
        tartan_cli(["fit", f"--config={CONFIGS / 'tasks/sciie.yaml'}", "--config", str(broken)])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: --config {broken}: not valid YAML: mapping values are not allowed here in ")
    assert last.endswith(f'"{broken}", line 3, column 19')


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
    ("configs", "options", "message"),
    [
        (["quickstart"], ["--trainer.accumulate_grad_batches=2"], "set --model.accumulate_grad_batches instead"),
        # fine-tuning before the TAPT run has written its export
        (["tasks/sciie", "methods/tapt_finetune"], [], "--model.encoder_name_or_path exports/sciie/tapt: no such"),
        # post-hoc fine-tuning without the checkpoint it starts from
        (["tasks/chemprot", "methods/posthoc"], [], "--model.init_checkpoint is required for post-hoc fine-tuning"),
        (["tasks/sciie", "methods/posthoc"], ["--model.init_checkpoint=gone.ckpt"], "--model.init_checkpoint gone.ckpt"),
        # a typo in a choice: refused, listing the choices, before the encoder loads
        (["quickstart"], ["--model.weighting=metaa"], "--model.weighting='metaa' is not one of ['aux_only', 'equal'"),
        # fit resumes a latest state, which `best` is not
        (["quickstart"], ["--ckpt_path=best"], "tartan fit resumes a run from its latest state: --ckpt_path last"),
        # Lightning would refuse a second early stopping on the same metric in a traceback
        (["quickstart"], ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/f1_macro"],
         "tartan stops early on the dev metric already (its `early_stopping` callback): set --early_stopping.patience"),
    ],
)
def test_mistakes_fail_before_anything_loads(configs, options, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config_files = [arg for config in configs for arg in ("--config", str(CONFIGS / f"{config}.yaml"))]
    with pytest.raises(SystemExit) as exit_info:
        tartan_cli(["fit", *config_files, *options])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_a_checkpoint_path_of_another_method_or_none_at_all_is_one_line(tiny_encoder, data_root, tmp_path, capsys):
    """LightningCLI builds the model from a `--ckpt_path` file's options, so resuming a TAPT run's checkpoint with the
    META-TARTAN config would train TAPT's method without a word; a mistyped path (`bst`) would end in a traceback."""
    tapt = TartanModule(tiny_encoder, num_labels=6, weighting="aux_only", aux_objectives=["tapt"])
    checkpoint = tmp_path / "tapt.ckpt"
    torch.save({"hyper_parameters": dict(tapt.hparams), "state_dict": tapt.state_dict()}, checkpoint)
    args = [f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}"]
    args += [f"--data.data_dir={data_root / 'citation_intent'}", f"--trainer.default_root_dir={tmp_path}"]
    # the same method with another learning rate: the resumed model would train at the checkpoint's
    meta = TartanModule(tiny_encoder, num_labels=6, weighting="meta", aux_objectives=["tapt"],
                        accumulate_grad_batches=2, encoder_lr=1e-3)
    other_rate = tmp_path / "meta.ckpt"
    torch.save({"hyper_parameters": dict(meta.hparams), "state_dict": meta.state_dict()}, other_rate)
    # the same model trained on other data: its loaders' positions would be restored into this data's
    other_data = tmp_path / "other_data.ckpt"
    options = dict(meta.hparams, encoder_lr=1e-4)
    elsewhere = {"data_dir": str(tmp_path / "elsewhere"), "aux_corpora": {"tapt": "train.txt"}}
    torch.save({"hyper_parameters": options, "datamodule_hyper_parameters": elsewhere}, other_data)
    for subcommand, ckpt_path, message in (
        ("fit", checkpoint, f"--ckpt_path {checkpoint} was trained with --model.weighting aux_only, not meta"),
        ("fit", other_rate, f"--ckpt_path {other_rate} resumes its run with that run's options, not "
                            "--model.encoder_lr 0.0001 (the checkpoint's: 0.001): resume without changing them"),
        ("fit", other_data, f"not --data.init_args.data_dir {data_root / 'citation_intent'} (the checkpoint's: "
                            f"{tmp_path / 'elsewhere'}): resume"),
        ("fit", tmp_path / "lst.ckpt", f"--ckpt_path {tmp_path / 'lst.ckpt'}: no such checkpoint file"),
        ("test", "bst", "--ckpt_path bst: no such checkpoint file (nor one of best, last, hpc)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tartan_cli([subcommand, *args, f"--ckpt_path={ckpt_path}"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert not list(tmp_path.rglob("metrics.csv"))  # nothing ran


def test_a_checkpoint_cut_off_while_being_written_is_one_line_naming_the_others(tiny_encoder, data_root, tmp_path,
                                                                                capsys):
    """A job killed while writing a checkpoint leaves a file torch cannot read: the command names it and the
    checkpoints beside it, whether given by path or found as a run's `last.ckpt` (`--ckpt_path best` reads it)."""
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    module = TartanModule(tiny_encoder, num_labels=6, weighting="meta", aux_objectives=["tapt"])
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, folder / "best.ckpt")
    whole = (folder / "best.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    args = [f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}",
            f"--data.data_dir={data_root / 'citation_intent'}", f"--trainer.default_root_dir={tmp_path}"]
    for subcommand, ckpt_path in (("test", folder / "last.ckpt"), ("test", "best"), ("fit", "last")):
        with pytest.raises(SystemExit) as exit_info:
            tartan_cli([subcommand, *args, f"--ckpt_path={ckpt_path}"])
        error = capsys.readouterr().err.splitlines()[-1]
        assert exit_info.value.code == 2
        assert f"--ckpt_path {folder / 'last.ckpt'}: the file is not a readable checkpoint (" in error
        assert error.endswith("Give another checkpoint's path; beside it: best.ckpt")


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(subcommand, tiny_encoder, data_root, tmp_path, capsys):
    """A forgotten `--ckpt_path` would score (or label with) the untrained classifier head, by chance."""
    args = [f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}"]
    args += [f"--data.data_dir={data_root / 'citation_intent'}", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        tartan_cli([subcommand, *args])
    assert exit_info.value.code == 2
    assert f"tartan {subcommand} needs the trained model: --ckpt_path best" in capsys.readouterr().err.splitlines()[-1]
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("predictions.jsonl"))


# ---- encoders of one's own ----------------------------------------------------------------------------------


def save_tiny_bert(folder: Path, tokenizer_from: str | None, dtype: torch.dtype = torch.float32, **config) -> str:
    """A 2-layer, 32-wide random BERT saved in `dtype`, with the tokenizer of `tokenizer_from` (None: no tokenizer
    files, as a bare `model.save_pretrained` leaves)."""
    options = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**{**options, **config})).to(dtype).save_pretrained(folder)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return str(folder)


def test_an_encoder_folder_without_its_tokenizer_is_one_line(tiny_encoder, data_root, tmp_path):
    """transformers would build a 5-token tokenizer that reads every word as unknown, and the run would train on it."""
    encoder = save_tiny_bert(tmp_path / "no_tokenizer", None)
    result = run_tartan(
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}", f"--trainer.default_root_dir={tmp_path}", *SMALL,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert f"tartan: error: the tokenizer '{encoder}' has 5 tokens for the encoder's 30522 embeddings" in last_line
    assert "--model.tokenizer_name_or_path" in last_line


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vocab_size": 1000}, "has 30522 tokens but the encoder's embedding table has 1000 rows"),
        ({"max_position_embeddings": 16}, "max_length=32 is longer than the 16 positions of the encoder"),
    ],
    ids=["vocabulary", "positions"],
)
def test_a_tokenizer_or_max_length_the_encoder_cannot_take_is_refused_before_a_step(
    config, message, tiny_encoder, data_root, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    encoder = save_tiny_bert(tmp_path / "encoder", tiny_encoder, **config)
    with pytest.raises(EncoderInputMismatch, match=re.escape(message)):
        tartan_cli(
            ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--model.encoder_name_or_path", encoder]
            + ["--data.data_dir", str(data_root / "citation_intent"), "--data.cache_dir", cache_dir, *SMALL]
        )


def test_a_separate_tokenizer_and_a_bf16_checkpoint_train_and_export(tiny_encoder, data_root, cache_dir, tmp_path,
                                                                     monkeypatch):
    """An encoder saved in bf16 without its tokenizer: the tokenizer comes from --model.tokenizer_name_or_path, the
    weights train in fp32, and the export cuts texts at the training max_length."""
    monkeypatch.chdir(tmp_path)
    encoder = save_tiny_bert(tmp_path / "bf16_encoder", None, dtype=torch.bfloat16)
    cli = tartan_cli(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--model.encoder_name_or_path", encoder]
        + ["--model.tokenizer_name_or_path", tiny_encoder, "--data.data_dir", str(data_root / "citation_intent")]
        + ["--data.cache_dir", cache_dir, "--trainer.fast_dev_run=true", *SMALL]
    )
    assert cli.trainer.state.finished and cli.datamodule.tokenizer_name_or_path == tiny_encoder
    assert {parameter.dtype for parameter in cli.model.parameters()} == {torch.float32}
    cli.model.save_end_task_model(tmp_path / "classifier")
    cli.model.save_mlm_model(tmp_path / "masked_lm")
    exported = AutoTokenizer.from_pretrained(tmp_path / "classifier")
    assert exported.model_max_length == 32 and len(exported) == len(AutoTokenizer.from_pretrained(tiny_encoder))
    # an encoder for further training keeps its tokenizer's own limit
    assert AutoTokenizer.from_pretrained(tmp_path / "masked_lm").model_max_length == 512
    for export in ("classifier", "masked_lm"):  # saved as trained, in fp32, not cast back to the encoder's bf16
        with safe_open(tmp_path / export / "model.safetensors", "pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}, export


def test_a_relative_logger_save_dir_is_made_absolute_so_resumes_keep_the_best_checkpoint(data_root, tmp_path,
                                                                                          monkeypatch):
    """ModelCheckpoint compares its folder with the resumed checkpoint's (absolute): a relative one makes it forget
    the best dev score and keep a worse checkpoint as `best`."""
    monkeypatch.chdir(tmp_path)
    cli = tartan_cli(
        ["--config", str(CONFIGS / "quickstart.yaml"), "--data.data_dir", str(data_root / "citation_intent")]
        + ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"],
        run=False,
    )
    assert cli.trainer.logger.save_dir == str(tmp_path / "runs")


def test_a_run_whose_encoder_folder_moved_says_how_to_load_it(tiny_encoder, data_root, cache_dir, tmp_path):
    """The checkpoint holds the weights but the model is built from the encoder's folder first: gone, the command
    says so in one line, and the Python route it names loads the run from the folder's new place."""
    encoder = shutil.copytree(tiny_encoder, tmp_path / "encoder")
    fitted = run_tartan(
        "fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--model.encoder_name_or_path={encoder}",
        f"--data.data_dir={data_root / 'citation_intent'}", f"--data.cache_dir={cache_dir}", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        *SMALL,
    )
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    moved = encoder.rename(tmp_path / "moved_encoder")
    result = run_tartan("test", f"--config={run / 'config.yaml'}", "--ckpt_path=best")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert f"--model.encoder_name_or_path {encoder}: no such folder. It is the encoder the checkpoint" in last_line
    assert "name its new place with --model.encoder_name_or_path <folder>" in last_line
    best = next((run / "checkpoints").glob("epoch=*.ckpt"))
    # from the run's config, or from the checkpoint file's options; a tokenizer named on its own moves too
    for ckpt_path, tokenizer in (("best", []), (best, []), (best, [f"--model.tokenizer_name_or_path={moved}"])):
        result = run_tartan("test", f"--config={run / 'config.yaml'}", f"--ckpt_path={ckpt_path}",
                            f"--model.encoder_name_or_path={moved}", *tokenizer)
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_tartan("test", f"--config={run / 'config.yaml'}", f"--ckpt_path={best}",
                        f"--model.encoder_name_or_path={moved}", f"--model.tokenizer_name_or_path={encoder}")
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(
        f"error: --model.tokenizer_name_or_path {encoder}: no such folder. It is the tokenizer the checkpoint"
    )
    resumed = run_tartan("fit", f"--config={run / 'config.yaml'}", "--ckpt_path=last", "--trainer.max_steps=3",
                         f"--model.encoder_name_or_path={moved}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    module = TartanModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", encoder_name_or_path=str(moved))
    module.save_end_task_model(tmp_path / "classifier")
    assert AutoTokenizer.from_pretrained(tmp_path / "classifier").model_max_length == 32
