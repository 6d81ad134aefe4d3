"""The `tartan` command: Lightning's CLI over `TartanModule` and the end-task data modules.

    tartan fit --config configs/tasks/citation_intent.yaml --config configs/methods/meta_tartan.yaml
    tartan test --config lightning_logs/version_0/config.yaml --ckpt_path path/to/best.ckpt

What the data module knows (number of classes, label names, auxiliary corpora, the metric the task is scored
by) is linked into the model and the default callbacks, so it is never typed twice.
"""
import difflib
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional
from urllib.error import URLError

import torch
import yaml

from huggingface_hub.utils import HFValidationError, validate_repo_id
from jsonargparse import Namespace
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info
from transformers import AutoConfig

from datamodules import DataFormatError, EndTaskDataModule  # the import registers every task for `--data <Name>`
from lightning_tartan.checkpoints import UNREADABLE, ResumableCheckpoint, load_lazily
from lightning_tartan.heads import EncoderInputMismatch
from lightning_tartan.module import (
    DATAMODULE_OPTIONS,
    MONITOR_METRICS,
    RUN_OPTIONS,
    CheckpointMismatch,
    TartanModule,
    weighting_class,
)
from lightning_tartan.packaged_encoders import local_copy
from lightning_tartan.posthoc import PostHocSelection
from lightning_tartan.predictions import PredictionWriter


CSV_LOGGER = "pytorch_lightning.loggers.CSVLogger"
TQDM_BAR = "lightning_tartan.callbacks.ResumableProgressBar"
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
#: `--ckpt_path` values that name no file: `best` and `last` (found in a run folder), and Lightning's `hpc`
LIGHTNING_CKPT_PATHS = ("best", "last", "hpc")
#: in a method config's paths, the task's name (`task_name`)
TASK = "{task}"


def dev_metric_key(monitor_metric: str) -> str:
    """The logged key of a task's dev metric, e.g. `val/f1_macro`."""
    return f"val/{monitor_metric}"


def needs_dev_samples(weighting: str) -> bool:
    """Whether the `weighting` strategy reads the `meta_dev` samples of a training batch (META-TARTAN)."""
    try:
        return weighting_class(weighting).needs_dev_samples
    except ValueError:
        return False  # the model refuses it, naming the option


def folder_moved(saved: Optional[str], asked: Optional[str]) -> bool:
    """Whether `asked` names the new place of a run's encoder (or tokenizer) folder `saved`: that one is gone, this
    one exists."""
    if not saved or not asked or saved == asked:
        return False
    return not Path(local_copy(saved)).exists() and not is_hub_model_id(saved) and Path(asked).is_dir()


def is_hub_model_id(name: str) -> bool:
    """Whether `name` could name a Hugging Face Hub model (`name` or `namespace/name`), unlike a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def the_tokenizer(encoder_name_or_path: str, tokenizer_name_or_path: Optional[str]) -> str:
    """The tokenizer a run uses: the one named, else the encoder's."""
    return tokenizer_name_or_path or encoder_name_or_path


class TartanArgumentParser(LightningArgumentParser):
    """Lightning's parser with errors read at a glance: a one-line usage instead of a hundred lines of options, the
    nearest option to a misspelt one, and the file of a config that is not valid YAML."""

    def format_usage(self) -> str:
        usage = super().format_usage()
        command = self.prog.replace(" [options]", "")  # jsonargparse's "tartan [options] fit"
        return usage if usage.count("\n") <= 2 else f"usage: {command} [--config CONFIG] [options]\n"

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self  # as jsonargparse picks the usage it prints
        super().error(readable_error(message, parser.format_help()), ex)

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Namespace:
        for config in config_files(sys.argv[1:] if args is None else args):
            check_yaml(self, config)
        return super().parse_args(args, *rest, **kwargs)


def readable_error(message: str, help_text: str) -> str:
    """jsonargparse's `message` for a mistyped option, with the options `help_text` lists that are closest to it; a
    misspelt option of the data module as one line instead of its union-type report."""
    unrecognized = re.fullmatch(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unrecognized:
        options = set(re.findall(r"--[\w.]+", help_text))
        typos = [word.split("=")[0] for word in unrecognized.group(1).split() if word.startswith("--")]
        close = {typo: difflib.get_close_matches(typo, options, n=1, cutoff=0.75) for typo in typos}
        hints = [near[0] for near in close.values() if near]
        return message + (f" (did you mean {', '.join(hints)}?)" if hints else "")
    key = re.match(r'Parser key "([\w.]+)":', message)
    option = re.search(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message)
    if key and option:
        module, _, name = option.group(1).rpartition(".")
        accepted = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
        near = _nearest(option.group(2), accepted, prefix=f"--{key.group(1)}.")
        return f"--{key.group(1)}.{option.group(2)}: {name} has no such option{near}"
    missing = re.search(r"class_path '[\w.]+':\s+module '([\w.]+)' has no attribute '(\w+)'", message)
    if key and missing:
        module, name = missing.groups()
        classes = [f"{module}.{member}" for member in dir(importlib.import_module(module)) if member[:1].isupper()]
        return f"--{key.group(1)}.class_path: {module} has no {name!r}{_nearest(f'{module}.{name}', classes)}"
    return message


def _nearest(word: str, choices: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{near[0]}?)" if near else f"; choose one of {', '.join(choices)}"


def config_files(args: Any) -> list[Path]:
    """The files given with ``--config``/``-c`` on a command line (a list of words)."""
    if not isinstance(args, (list, tuple)):
        return []
    files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    files += [word.split("=", 1)[1] for word in args if isinstance(word, str) and word.startswith("--config=")]
    return [Path(file) for file in files if Path(file).is_file()]


def check_yaml(parser: LightningArgumentParser, config: Path) -> None:
    """A config that is not YAML, reported with its own name (jsonargparse reports the text, "<unicode string>")."""
    try:
        with config.open(encoding="utf-8") as stream:
            yaml.safe_load(stream)
    except yaml.YAMLError as err:
        parser.error(f"--config {config}: not valid YAML: {' '.join(str(err).split())}")


class TartanCLI(LightningCLI):
    """`LightningCLI` with TARTAN's links and its default callbacks: keep the best dev checkpoint and an always
    current `last.ckpt` (`--ckpt_path last` resumes the newest one), stop early, write predictions."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # what `tartan predict` writes
        parser.set_defaults({"checkpoint.mode": "max", "checkpoint.save_last": True, "early_stopping.mode": "max"})
        # the monitored metric is a dev metric: check it after each dev evaluation, not at the end of a training
        # epoch, which a run of fewer steps than an epoch (a TAPT stage on a big corpus) ends before any evaluation
        parser.set_defaults({"early_stopping.check_on_train_epoch_end": False})
        # metrics.csv (or any logger) gets every optimizer step's losses and task weights, not every 50th
        parser.set_defaults({"trainer.log_every_n_steps": 1})
        # The data tokenizes with the tokenizer the model saves with its exports: --model.tokenizer_name_or_path,
        # by default the encoder's.
        parser.link_arguments(
            ("model.encoder_name_or_path", "model.tokenizer_name_or_path"),
            "data.init_args.tokenizer_name_or_path",
            compute_fn=the_tokenizer,
            apply_on="parse",
        )
        # What the model trains decides what the data builds: the dev samples only for a strategy that reads them.
        parser.link_arguments(
            "model.weighting", "data.init_args.include_meta_dev", compute_fn=needs_dev_samples, apply_on="parse"
        )
        # The data groups each optimizer step's micro-batches into one training batch.
        parser.link_arguments(
            "model.accumulate_grad_batches", "data.init_args.accumulate_grad_batches", apply_on="parse"
        )
        # What the task knows, as `TartanModule.from_datamodule` wires it; the encoder's tokenizer and the
        # micro-batches per step are set on the model's side above.
        for source, target in DATAMODULE_OPTIONS.items():
            if target not in ("tokenizer_name_or_path", "accumulate_grad_batches"):
                parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        # The task decides what "best" means (macro-F1 for most, accuracy for ChemProt; --data.monitor_metric).
        for callback in ("checkpoint", "early_stopping"):
            parser.link_arguments(
                "data.monitor_metric", f"{callback}.monitor", compute_fn=dev_metric_key, apply_on="instantiate"
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Also remember the model options the command asks for: LightningCLI next replaces them with those stored in
        a `--ckpt_path` file, so a fit resumed from another method's checkpoint would train that method."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.asked_model = config.get("model").clone()
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            self.read_checkpoint(Path(ckpt_path))  # before LightningCLI reads it, and fails in a traceback

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint file's contents, its tensors left on disk until read; one line naming the file when it cannot
        be read (a job killed while writing it, say), and the other checkpoints beside it."""
        try:
            return load_lazily(path)
        except UNREADABLE as err:
            others = sorted(other.name for other in path.parent.glob("*.ckpt") if other.name != path.name)
            beside = f"; beside it: {', '.join(others)}" if others else ""
            reason = str(err).splitlines()[0].split(". ")[0]  # torch adds paragraphs of advice on re-saving
            self.parser.error(
                f"--ckpt_path {path}: the file is not a readable checkpoint ({reason}); was it cut off while being "
                f"written? Give another checkpoint's path{beside}"
            )

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self._subcommand_config().model.tokenizer_name_or_path = self.tokenizer_given

    def before_instantiate_classes(self) -> None:
        """Name the option behind mistakes that Lightning or transformers would report late or obscurely."""
        config, error = self._subcommand_config(), self.parser.error
        if config.trainer.accumulate_grad_batches != 1:
            error(
                "TartanModule optimizes manually: set --model.accumulate_grad_batches instead of "
                f"--trainer.accumulate_grad_batches (got {config.trainer.accumulate_grad_batches})"
            )
        if config.trainer.gradient_clip_val is not None:
            error(
                "TartanModule optimizes manually and clips its gradients itself: set --model.max_grad_norm instead of "
                f"--trainer.gradient_clip_val (got {config.trainer.gradient_clip_val}; max_grad_norm inf does not clip)"
            )
        try:
            weighting_class(config.model.weighting)  # before the data is read: a typo is the error to report
        except ValueError as err:
            error(f"--model.{err}")
        if config.trainer.strategy in DDP_STRATEGIES:
            # each objective's backward leaves the other objectives' heads unused, which DDP must be told
            config.trainer.strategy = f"{config.trainer.strategy}_find_unused_parameters_true"
        callbacks = config.trainer.callbacks or []
        posthoc = any(str(getattr(callback, "class_path", "")).endswith(".PostHocSelection") for callback in callbacks)
        init_checkpoint = config.model.init_checkpoint
        if posthoc and init_checkpoint is None:
            error(
                "--model.init_checkpoint is required for post-hoc fine-tuning: the best checkpoint of an MT- or "
                "META-TARTAN run, e.g. lightning_logs/version_0/checkpoints/<best>.ckpt"
            )
        if init_checkpoint is not None and not Path(init_checkpoint).is_file():
            error(f"--model.init_checkpoint {init_checkpoint}: no such checkpoint file")
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt_path == "best":
            error(
                "tartan fit resumes a run from its latest state: --ckpt_path last (or a checkpoint's path); best is "
                "for validate, test and predict, or --model.init_checkpoint <its path> to start from its weights"
            )
        dev_metrics = [None, *map(dev_metric_key, MONITOR_METRICS)]
        dev_keys = [*dev_metrics[1:], "val/loss"]
        for callback in callbacks:
            monitor = getattr(getattr(callback, "init_args", None), "monitor", None)
            if isinstance(monitor, str) and monitor.startswith("val") and monitor not in dev_keys:
                # Lightning would say so at the first dev evaluation, after training up to it
                name = str(callback.class_path).rpartition(".")[2]
                near = difflib.get_close_matches(monitor, dev_keys, n=1, cutoff=0.6)
                error(
                    f"{name}(monitor={monitor!r}) in --trainer.callbacks: the model logs no such key"
                    f"{f' (did you mean {near[0]}?)' if near else ''}; its dev metrics are {', '.join(dev_keys)}"
                )
            if str(getattr(callback, "class_path", "")).endswith(".EarlyStopping") and monitor in dev_metrics:
                error(
                    "tartan stops early on the dev metric already (its `early_stopping` callback): set "
                    "--early_stopping.patience (and .min_delta, .mode) instead of adding an EarlyStopping to "
                    "--trainer.callbacks"
                )
        named = ckpt_path in LIGHTNING_CKPT_PATHS or str(ckpt_path).startswith("registry")  # Lightning's model registry
        if ckpt_path and not named and not Path(ckpt_path).is_file():
            error(f"--ckpt_path {ckpt_path}: no such checkpoint file (nor one of {', '.join(LIGHTNING_CKPT_PATHS)})")
        if self.subcommand == "fit" and ckpt_path and Path(ckpt_path).is_file():
            if config.model.weighting != self.asked_model.weighting:
                error(
                    f"--ckpt_path {ckpt_path} was trained with --model.weighting {config.model.weighting}, not "
                    f"{self.asked_model.weighting}: resuming it would train its own method. Resume it with its own "
                    f"config, or start from its weights with --model.init_checkpoint {ckpt_path}"
                )
        if self.subcommand in ("validate", "test", "predict") and not ckpt_path and init_checkpoint is None:
            # the classifier head would be the untrained one the model starts with: scores and labels by chance
            error(
                f"tartan {self.subcommand} needs the trained model: --ckpt_path best (or last) with --config "
                "<run folder>/config.yaml, or the path of a checkpoint file"
            )
        if config.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in str(getattr(callback, "class_path", "")) for callback in callbacks
        ):
            # Lightning's default is its Rich bar where rich is installed, which titles a run by steps "Epoch 0/-2";
            # tqdm's counts the optimizer steps of the epoch (up to max_steps) beside the losses
            config.trainer.callbacks = [*callbacks, Namespace(class_path=TQDM_BAR, init_args=Namespace())]
        if config.trainer.logger in (None, True):
            # Lightning's default is TensorBoard where tensorboard is installed and CSV elsewhere; make it CSV
            # everywhere, so every run folder has its metrics.csv (--trainer.logger picks another)
            # absolute, as ModelCheckpoint makes an explicit dirpath: a `--ckpt_path last` resume gives the callback
            # its checkpoint folder, which must equal the stored one for the best dev score to be restored
            save_dir = str(Path(config.trainer.default_root_dir or ".").resolve())
            config.trainer.logger = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=save_dir))
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if isinstance(getattr(init_args, "save_dir", None), str):  # a logger's own --trainer.logger.save_dir too
                init_args.save_dir = str(Path(init_args.save_dir).resolve())
        self._log_beside_a_moved_run(config, loggers)
        if ckpt_path and Path(ckpt_path).is_file():
            self._folders_in_their_new_place(config)
        # The model records the tokenizer the data (linked at parse time) tokenizes with; the run's config.yaml
        # keeps the option as given (`after_instantiate_classes`), so that reused with another encoder it takes
        # that encoder's tokenizer.
        self.tokenizer_given = config.model.tokenizer_name_or_path
        config.model.tokenizer_name_or_path = the_tokenizer(
            config.model.encoder_name_or_path, config.model.tokenizer_name_or_path
        )
        _fill_task(config)
        self._check_encoder(config.model.encoder_name_or_path, ckpt_path)
        self._check_tokenizer(config.model.tokenizer_name_or_path, ckpt_path)
        if ckpt_path == "last" or (self.subcommand != "fit" and ckpt_path == "best"):
            self._find_run_checkpoint(config)
        if self.subcommand in ("validate", "test", "predict") and config.ckpt_path and Path(config.ckpt_path).is_file():
            self._classes_from_checkpoint(config)
        if self.subcommand == "fit" and config.ckpt_path and Path(config.ckpt_path).is_file():
            self._check_resumed_options(config)
            rank_zero_info(f"Resuming from {config.ckpt_path}")

    def _check_resumed_options(self, config: Namespace) -> None:
        """A resumed fit trains with its checkpoint's model options and learning rates, whatever the command says:
        LightningCLI builds the model from a checkpoint file's options, and the optimizer's saved state holds the
        rates. Refuse a command that asks for others, rather than record them in the run's config.yaml and train
        without them; and one that names other data (`--ckpt_path last` finds only runs of the same data). How the
        steps run (`RUN_OPTIONS`: kernels, compilation, packing, checkpointing) follows the command."""
        saved = self.read_checkpoint(Path(config.ckpt_path))
        options = saved.get("hyper_parameters", {})
        task = task_name(config.data)
        changed = []
        for key, asked in self.asked_model.as_dict().items():
            if key in RUN_OPTIONS:
                setattr(config.model, key, asked)  # how the resumed steps run is the command's to say
                continue
            if isinstance(asked, str):
                asked = asked.replace(TASK, task)
            if key in ("encoder_name_or_path", "tokenizer_name_or_path") and folder_moved(options.get(key), asked):
                continue  # the run's folder, moved since
            if asked is not None and key in options and _plain(options[key]) != _plain(asked):
                changed.append(f"--model.{key} {asked} (the checkpoint's: {options[key]})")
        # the data: its loaders' saved positions would be restored into another dataset's
        data, asked_data = saved.get("datamodule_hyper_parameters", {}), getattr(config.data, "init_args", Namespace())
        for key in ("data_dir", "dataset", "dataset_config", "train_file", "aux_corpora"):
            theirs, mine = data.get(key), _plain(getattr(asked_data, key, None))
            if key == "data_dir":
                theirs, mine = (None if value is None else str(Path(value).resolve()) for value in (theirs, mine))
            if key in data and _plain(theirs) != mine:
                changed.append(f"--data.init_args.{key} {mine} (the checkpoint's: {theirs})")
        if changed:
            self.parser.error(
                f"--ckpt_path {config.ckpt_path} resumes its run with that run's options, not "
                f"{'; '.join(changed)}: resume without changing them, or start a new run from its weights with "
                f"--model.init_checkpoint {config.ckpt_path}"
            )

    def _folders_in_their_new_place(self, config: Namespace) -> None:
        """LightningCLI builds the model from a checkpoint file's options, over the command's: an encoder (or
        tokenizer) folder moved since is taken from the command's `--model.encoder_name_or_path` (or
        `--model.tokenizer_name_or_path`); a tokenizer that was the encoder's moves with it. (The checkpoint's weights
        then replace the folder's.)"""
        model, asked, data = config.model, self.asked_model, getattr(config.data, "init_args", None)
        saved_encoder, saved_tokenizer = model.encoder_name_or_path, model.tokenizer_name_or_path
        if folder_moved(saved_encoder, asked.encoder_name_or_path):
            model.encoder_name_or_path = asked.encoder_name_or_path
            if saved_tokenizer in (None, saved_encoder):
                model.tokenizer_name_or_path = asked.tokenizer_name_or_path
        if folder_moved(saved_tokenizer, asked.tokenizer_name_or_path):
            model.tokenizer_name_or_path = asked.tokenizer_name_or_path
        if getattr(data, "tokenizer_name_or_path", None) in (saved_encoder, saved_tokenizer):  # linked from them
            data.tokenizer_name_or_path = the_tokenizer(model.encoder_name_or_path, model.tokenizer_name_or_path)

    def _classes_from_checkpoint(self, config: Namespace) -> None:
        """Validate, test and predict with the checkpoint's classes (unless `--data.init_args.label_names` names
        them): labeling new texts then needs no training data, and a split labeled with other classes is refused
        naming its file and line."""
        init_args = getattr(config.data, "init_args", None)
        if not hasattr(init_args, "label_names") or init_args.label_names is not None:
            return
        saved = self.read_checkpoint(Path(config.ckpt_path)).get("hyper_parameters", {})
        if saved.get("label_names"):
            init_args.label_names = list(saved["label_names"])

    def _log_beside_a_moved_run(self, config: Namespace, loggers: list[Any]) -> None:
        """A run's `config.yaml` records where it logged; given from a run folder moved (or copied) since, the new
        logs go beside it, not back into the folder it was moved from."""
        for given in config.get("config") or []:
            run_config = Path(str(given)).resolve()
            run = run_config.parent
            if run_config.name != "config.yaml" or not (run / "checkpoints").is_dir():
                continue
            for logger in loggers:
                init_args = getattr(logger, "init_args", None)
                save_dir = getattr(init_args, "save_dir", None)
                if not isinstance(save_dir, str):
                    continue
                logged = Path(save_dir) / (getattr(init_args, "name", "lightning_logs") or "")
                if logged.resolve() != run.parent and not (logged / run.name / "config.yaml").is_file():
                    rank_zero_info(f"{run} was logged under {logged}, which no longer holds it: logging beside it")
                    init_args.save_dir, init_args.name = str(run.parent.parent), run.parent.name
                    if config.trainer.default_root_dir == save_dir:
                        config.trainer.default_root_dir = init_args.save_dir

    def _check_encoder(self, encoder: str, ckpt_path: Optional[str]) -> None:
        encoder = local_copy(encoder)
        if Path(encoder).exists():
            return
        if not is_hub_model_id(encoder):
            if ckpt_path is not None:
                # LightningCLI gives a checkpoint file's model options precedence over the command line's, and a
                # run found by best/last must be trained from the encoder given
                self.parser.error(
                    f"--model.encoder_name_or_path {encoder}: no such folder. It is the encoder the checkpoint "
                    f"({ckpt_path}) was trained from, which the model is built from before the checkpoint's weights "
                    "load: put the folder back, or name its new place with --model.encoder_name_or_path <folder> "
                    "(from Python: TartanModule.load_from_checkpoint(path, encoder_name_or_path=<folder>))"
                )
            self.parser.error(
                f"--model.encoder_name_or_path {encoder}: no such folder (a TAPT/DAPT export exists once its "
                "stage-1 config, e.g. configs/methods/tapt.yaml, has been fit)"
            )
        try:
            AutoConfig.from_pretrained(encoder)  # cached after the first run; the model loads the same file
        except OSError as err:
            reason = str(err).splitlines()[0]
            self.parser.error(
                f"--model.encoder_name_or_path {encoder}: neither a local folder nor reachable on the Hugging Face "
                f"Hub ({reason})"
            )

    def _check_tokenizer(self, tokenizer: str, ckpt_path: Optional[str]) -> None:
        if Path(local_copy(tokenizer)).exists() or is_hub_model_id(tokenizer):
            return  # a Hub name that cannot be reached fails as the encoder's would, when the data module loads it
        trained = ""
        if ckpt_path:
            trained = (
                f". It is the tokenizer the checkpoint ({ckpt_path}) was trained with: put the folder back, or name "
                "its new place with --model.tokenizer_name_or_path <folder>"
            )
        self.parser.error(f"--model.tokenizer_name_or_path {tokenizer}: no such folder{trained}")

    def _find_run_checkpoint(self, config: Namespace) -> None:
        """`--ckpt_path last` (and, but for fit, `best`): the newest earlier run of this command's task and method,
        or the run whose `config.yaml` is given. Fit resumes its `last.ckpt` and keeps writing to its checkpoint
        folder, so its best-checkpoint bookkeeping carries over (Lightning resets it in a new folder); the other
        commands load its `last.ckpt`, or the best dev checkpoint that one records."""
        which = config.ckpt_path
        run_configs = [Path(str(path)).parent for path in config.get("config") or []]
        runs = [folder for folder in run_configs if (folder / "checkpoints" / "last.ckpt").is_file()]
        if config.checkpoint.dirpath:
            candidates = [Path(config.checkpoint.dirpath) / "last.ckpt"]
            searched = str(candidates[0])
        elif runs:
            candidates = [runs[-1] / "checkpoints" / "last.ckpt"]
            searched = str(candidates[0])
        else:
            root = _log_root(config.trainer)
            candidates = list(root.glob("*/checkpoints/last.ckpt"))
            searched = str(root / "*" / "checkpoints" / "last.ckpt")
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            self.parser.error(f"--ckpt_path {which}: no checkpoint at {searched}")
        differences = {path: _run_differences(config, path.parent.parent / "config.yaml") for path in existing}
        same_run = [path for path, differ in differences.items() if not differ]
        if not same_run:
            newest = max(existing, key=lambda path: path.stat().st_mtime)
            run = newest.parent.parent
            what = "give its checkpoint file"
            if self.subcommand == "fit":
                what = f"resume it with --config {run / 'config.yaml'}"
            self.parser.error(
                f"--ckpt_path {which}: no earlier run of this task and method at {searched}; the newest, {run}, "
                f"differs in {'; '.join(differences[newest])} ({what})"
            )
        last = max(same_run, key=lambda path: path.stat().st_mtime)
        if self.subcommand == "fit":
            config.checkpoint.dirpath = str(last.parent)
            config.ckpt_path = str(last)
            return
        chosen = _best_checkpoint(self.read_checkpoint(last), last.parent) if which == "best" else last
        if chosen is None:
            self.parser.error(f"--ckpt_path best: {last} records no best dev checkpoint that still exists")
        rank_zero_info(f"Loading {chosen}")
        config.ckpt_path = str(chosen)

    def instantiate_classes(self) -> None:
        # The model's links read the task's labels first, so a wrong data_dir surfaces here: name the option.
        try:
            super().instantiate_classes()
        except (FileNotFoundError, URLError) as err:
            init_args = self._subcommand_config().data.init_args
            dataset = getattr(init_args, "dataset", None)
            if dataset and isinstance(err, DataFormatError):
                self.parser.error(str(err))  # names `dataset`, and whether it is a folder
            option = f"--data.dataset {dataset}" if dataset else f"--data.data_dir {init_args.data_dir}"
            reason = str(err)
            if isinstance(err, URLError):
                reason = f"its files are missing and downloading them failed ({err.reason})"
            self.parser.error(f"{option}: {reason}")
        except ValueError as err:
            # our own checks name the option (or file and line); jsonargparse wraps them in a dump of every option
            self.parser.error(str(_root_cause(err)))

    def before_fit(self) -> None:
        """A resumed fit writes on into its checkpoint's folder. Post-hoc fine-tuning keeps its result only if it
        beats the starting model: score that one first."""
        ckpt_path = self._subcommand_config().get("ckpt_path")
        for callback in self.trainer.callbacks:  # checkpoint callbacks of one's own may come first
            if isinstance(callback, ResumableCheckpoint) and ckpt_path and Path(ckpt_path).is_file():
                callback.resume_from = ckpt_path
        if any(isinstance(callback, PostHocSelection) for callback in self.trainer.callbacks):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def _subcommand_config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config


def tartan_cli(args: ArgsType = None, run: bool = True) -> TartanCLI:
    """Build (and with `run`, execute) the CLI; in-process entry for tests and notebooks, e.g.
    `tartan_cli(["fit", "--config", "configs/quickstart.yaml"]).trainer.callback_metrics`."""
    return TartanCLI(
        TartanModule,
        EndTaskDataModule,
        subclass_mode_data=True,
        # TartanModule builds its own optimizer groups and schedule; no `--optimizer` to silently replace them.
        auto_configure_optimizers=False,
        # the seed Lightning falls back to, given without its warning (and recorded in the run's config.yaml)
        seed_everything_default=0,
        parser_class=TartanArgumentParser,
        parser_kwargs={
            "prog": "tartan",  # in a notebook or a test too, not the Python file that runs
            "description": "TARTAN: end-task aware training of masked-LM encoders (MT-/META-TARTAN).",
            "allow_abbrev": False,  # `--trainer.max_step 3` is a typo to report, not `max_steps` to guess
        },
        args=args,
        run=run,
    )


def task_name(data: Namespace) -> str:
    """What `{task}` stands for in a method config's paths (`exports/{task}/tapt`), so one method config serves every
    task: the name of the task's Hub dataset (and its configuration: `glue_rte`) when it reads one, else of its data
    folder. A dataset goes first: its `data_dir`, if any, only holds corpora, and may be shared by several."""
    init_args = getattr(data, "init_args", None)
    dataset = getattr(init_args, "dataset", None)
    if dataset:
        config = getattr(init_args, "dataset_config", None)
        name = Path(str(dataset).rstrip("/")).name
        return f"{name}_{config}" if config else name
    source = getattr(init_args, "data_dir", None) or "task"
    return Path(str(source).rstrip("/")).name


def _fill_task(config: Namespace) -> None:
    """Put the task's name into the paths that hold `{task}`: the encoder (and its linked tokenizers) and the
    folders callbacks write to."""
    task = task_name(config.data)
    model, data_args = config.model, getattr(config.data, "init_args", None)
    paths = ((model, "encoder_name_or_path"), (model, "tokenizer_name_or_path"), (data_args, "tokenizer_name_or_path"))
    for owner, key in paths:
        value = getattr(owner, key, None)
        if isinstance(value, str) and TASK in value:
            setattr(owner, key, value.replace(TASK, task))
    for callback in config.trainer.callbacks or []:
        init_args = getattr(callback, "init_args", None)
        dirpath = getattr(init_args, "dirpath", None)
        if isinstance(dirpath, str) and TASK in dirpath:
            init_args.dirpath = dirpath.replace(TASK, task)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error, stopping at one raised `from None`: that one's message is meant to be read."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            return error
        error = inner


#: the options that make two runs the same task and method, for `--ckpt_path last` to pick a run of this one's
RUN_IDENTITY = (
    "data.class_path",
    "data.init_args.data_dir",
    "data.init_args.dataset",
    "data.init_args.aux_corpora",
    "model.weighting",
    "model.encoder_name_or_path",
)


def _run_differences(config: Namespace, run_config: Path) -> list[str]:
    """How the run whose `config.yaml` is `run_config` differs from `config` in `RUN_IDENTITY`, e.g.
    `["model.weighting: none, not meta"]`; nothing for a run without one (it cannot be told apart)."""
    if not run_config.is_file():
        return []
    saved = yaml.safe_load(run_config.read_text()) or {}
    ours = config.as_dict()
    differences = []
    for key in RUN_IDENTITY:
        theirs, mine = _dotted(saved, key), _dotted(ours, key)
        if key.endswith("data_dir"):
            theirs, mine = (None if value is None else str(Path(value).resolve()) for value in (theirs, mine))
        if key.endswith("encoder_name_or_path") and folder_moved(theirs, mine):
            continue
        if theirs != mine:
            differences.append(f"{key}: {theirs}, not {mine}")
    return differences


def _plain(value: Any) -> Any:
    """`value` with tuples as lists, as a checkpoint's options and a parsed command's compare."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _dotted(config: dict, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _best_checkpoint(last: dict[str, Any], folder: Path) -> Optional[Path]:
    """The best dev checkpoint that the run's checkpoint callback recorded in `last.ckpt`, if it still exists: in
    `folder`, the one `last.ckpt` is in (a run folder moved or copied since has its own), or where it was written."""
    callbacks = last.get("callbacks", {})
    recorded = [
        Path(state["best_model_path"])
        for state in callbacks.values()
        if isinstance(state, dict) and state.get("best_model_path")
    ]
    found = [path for written in recorded for path in (folder / written.name, written) if path.is_file()]
    return found[0] if found else None


def _log_root(trainer: Namespace) -> Path:
    """The folder whose `version_*` subfolders hold the runs' logs and checkpoints (Lightning's default layout)."""
    logger = trainer.logger
    init_args = getattr(logger, "init_args", None)
    save_dir = getattr(init_args, "save_dir", None) or trainer.default_root_dir or "."
    name = getattr(init_args, "name", "lightning_logs") if init_args is not None else "lightning_logs"
    return Path(save_dir) / (name or "")


#: warnings every `tartan` run would print that its user can do nothing about: Lightning noting that the model
#: prepares its batches itself (`TartanModule.on_before_batch_transfer`, by design, whatever the data module), and
#: torch deprecations inside Lightning's own code and inside torchdata's loader (which Lightning rebuilds to predict)
QUIET_WARNINGS = (
    (r"You have overridden `on_before_batch_transfer` in `LightningModule`", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"'set_vital' is deprecated", UserWarning),
)


def main(args: ArgsType = None) -> None:
    """Entry point of the `tartan` console script: a data file that cannot be used, a checkpoint of another task, or
    a tokenizer or max_length the encoder cannot take, is reported as the CLI's own errors are, in one line naming
    the file and line or what differs (from Python, `DataFormatError`, `CheckpointMismatch` and
    `EncoderInputMismatch` are raised as usual). A run stopped by Ctrl-C exits with 130, and one stopped by SIGTERM
    with 143, as a shell command killed by the signal does."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        cli = tartan_cli(args)
    except (DataFormatError, CheckpointMismatch, EncoderInputMismatch) as err:
        print(f"tartan: error: {err}", file=sys.stderr)
        sys.exit(2)
    if torch.distributed.is_initialized():  # torch asks for this before a process that joined a group exits
        torch.distributed.destroy_process_group()
    for callback in cli.trainer.callbacks:  # beside checkpoint callbacks of one's own, which Lightning may list first
        if isinstance(callback, ResumableCheckpoint) and callback.stop_signal is not None:
            # the run did not finish: `tartan fit ... && tartan test ...` must not go on, nor a scheduler count it done
            sys.exit(128 + callback.stop_signal)


if __name__ == "__main__":
    main()
