"""The `tartan` command: Lightning's CLI over `TartanModule` and the end-task data modules.

    tartan fit --config configs/citation_intent/meta_tartan.yaml
    tartan test --config configs/citation_intent/meta_tartan.yaml --ckpt_path path/to/best.ckpt

What the data module knows (number of classes, label names, auxiliary corpora, the metric the task is scored
by) is linked into the model and the default callbacks, so it is never typed twice.
"""
from pathlib import Path
from urllib.error import URLError

from huggingface_hub.utils import HFValidationError, validate_repo_id
from jsonargparse import Namespace
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from datamodules import EndTaskDataModule  # importing the package registers every task for `--data <Name>`
from lightning_tartan.module import TartanModule
from lightning_tartan.posthoc import PostHocSelection


def dev_metric_key(monitor_metric: str) -> str:
    """The logged key of a task's dev metric, e.g. `val/f1_macro`."""
    return f"val/{monitor_metric}"


def is_hub_model_id(name: str) -> bool:
    """Whether `name` could name a Hugging Face Hub model (`name` or `namespace/name`), unlike a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


class TartanCLI(LightningCLI):
    """`LightningCLI` with TARTAN's links and its default callbacks: keep the best dev checkpoint, stop early."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"checkpoint.mode": "max", "checkpoint.save_last": True, "early_stopping.mode": "max"})
        # The tokenizer is the encoder's: the data tokenizes with it and the model saves it with exports.
        for target in ("data.init_args.tokenizer_name_or_path", "model.tokenizer_name_or_path"):
            parser.link_arguments("model.encoder_name_or_path", target, apply_on="parse")
        for source, target in (
            ("num_labels", "num_labels"),
            ("label_names", "label_names"),
            ("aux_names", "aux_objectives"),
            ("monitor_metric", "monitor_metric"),
        ):
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        # The task decides what "best" means (macro-F1 for most, accuracy for ChemProt).
        for callback in ("checkpoint", "early_stopping"):
            parser.link_arguments(
                "data.monitor_metric", f"{callback}.monitor", compute_fn=dev_metric_key, apply_on="instantiate"
            )

    def before_instantiate_classes(self) -> None:
        """Name the option behind two mistakes that Lightning or transformers would report obscurely."""
        config, error = self._subcommand_config(), self._parser(self.subcommand).error
        if config.trainer.accumulate_grad_batches != 1:
            error(
                "TartanModule optimizes manually: set --model.accumulate_grad_batches instead of "
                f"--trainer.accumulate_grad_batches (got {config.trainer.accumulate_grad_batches})"
            )
        posthoc = any(str(getattr(cb, "class_path", "")).endswith(".PostHocSelection") for cb in config.trainer.callbacks or [])
        init_checkpoint = config.model.init_checkpoint
        if posthoc and init_checkpoint is None:
            error(
                "--model.init_checkpoint is required for post-hoc fine-tuning: the best checkpoint of an MT- or "
                "META-TARTAN run, e.g. lightning_logs/version_0/checkpoints/<best>.ckpt"
            )
        if init_checkpoint is not None and not Path(init_checkpoint).is_file():
            error(f"--model.init_checkpoint {init_checkpoint}: no such checkpoint file")
        encoder = config.model.encoder_name_or_path
        if not Path(encoder).exists() and not is_hub_model_id(encoder):
            error(
                f"--model.encoder_name_or_path {encoder}: no such folder (a TAPT/DAPT export exists once its "
                "stage-1 config, e.g. configs/<task>/tapt.yaml, has been fit)"
            )

    def instantiate_classes(self) -> None:
        # The model's links read the task's labels first, so a wrong data_dir surfaces here: name the option.
        try:
            super().instantiate_classes()
        except (FileNotFoundError, URLError) as err:
            data_dir = self._subcommand_config().data.init_args.data_dir
            reason = str(err)
            if isinstance(err, URLError):
                reason = f"its files are missing and downloading them failed ({err.reason})"
            self._parser(self.subcommand).error(f"--data.data_dir {data_dir}: {reason}")

    def before_fit(self) -> None:
        """Post-hoc fine-tuning keeps its result only if it beats the starting model: score that one first."""
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
        parser_kwargs={"description": "TARTAN: end-task aware training of masked-LM encoders (MT-/META-TARTAN)."},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the `tartan` console script."""
    tartan_cli(args)


if __name__ == "__main__":
    main()
