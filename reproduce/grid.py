"""Reproduce the paper's table: tasks x methods x seeds, each stage one run of the real `tartan` command.

    python reproduce/grid.py --profile reproduce/profiles/cpu.yaml --jobs 2
    python reproduce/grid.py --profile reproduce/profiles/gpu.yaml --gpus 0 1 --jobs 4
    python reproduce/grid.py --profile reproduce/profiles/cpu.yaml --aggregate-only --results docs/results
    python reproduce/grid.py --profile reproduce/profiles/smoke.yaml -- --data.init_args.cache_dir /tmp/cache

A method is a chain of stages (`tartan fit` of a shipped config, then `tartan test` of its checkpoint). Methods
that share a stage (MT-TARTAN and its post-hoc fine-tuning share the MT-TARTAN fit) form one chain per task and
seed; chains run concurrently, up to `--jobs` at once. Every stage has its own folder,
`<out>/<task>/seed<seed>/<stage>/`, holding its `log.txt`, its Lightning logs (`logs/`), checkpoints and, once
it succeeded, `done.json`. A rerun skips stages with `done.json` and (task, method, seed) results already
recorded, and starts again any stage that was interrupted or failed, so the grid resumes after a kill. A folder's
runs share one profile, encoder, data root and set of options after `--`, kept in `<out>/grid.json`: once the
folder holds a record, a rerun with others is refused rather than mixed into the same table.

Each finished (task, method, seed) is one JSON record under `<out>/records/`; the tables (`runs.json`,
`results.json`, `results.md`, `results.png` in `--results`, by default `<out>/results`) are rebuilt from all
records at the end of every run, an interrupted one included. `--aggregate-only` rebuilds them without running
anything: from the records, or, where `<out>` holds none (a published table such as docs/results), from the
`runs.json` already in `--results`, which holds every record.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PAPER_RESULTS = REPO / "reproduce" / "paper_results.json"
TASKS = sorted(path.stem for path in (CONFIGS / "tasks").glob("*.yaml"))
#: in an output folder: what all its runs share (`grid_settings`)
GRID_SETTINGS = "grid.json"
LOG_TAIL_LINES = 15
#: task -> method -> {"metric", "mean", "sd", "n", "seeds"}
Table = dict[str, dict[str, dict[str, Any]]]


# ---- methods: chains of stages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """One `tartan fit --config configs/tasks/<task>.yaml --config configs/methods/<config>.yaml` stage.

    `name` is its folder: methods that list an equal Fit share that one run. `config` is also the key of the
    profile's extra options for the stage.
    """

    name: str
    config: str
    args: tuple[str, ...] = ()
    #: an exporting fit whose export is this fit's encoder
    encoder_from: Optional[Fit] = None
    #: a fit whose best checkpoint this one starts from (`--model.init_checkpoint`)
    init_from: Optional[Fit] = None
    #: the config ends with an `ExportEncoder`; the harness points it into the stage folder
    exports: bool = False
    #: the fit writes posthoc_selection.json, naming the checkpoint to test
    selects: bool = False

    @property
    def parents(self) -> tuple[Fit, ...]:
        return tuple(parent for parent in (self.encoder_from, self.init_from) if parent is not None)

    def lineage(self) -> list[Fit]:
        """Every fit this one needs, in run order, itself last."""
        fits: list[Fit] = []
        for parent in self.parents:
            fits += [fit for fit in parent.lineage() if fit not in fits]
        return [*fits, self]


def posthoc(start: Fit) -> Fit:
    """Post-hoc fine-tuning of `start`'s best checkpoint, tested on whichever model wins on dev."""
    return Fit(f"{start.name}_posthoc", "posthoc", init_from=start, selects=True)


BASELINE = Fit("baseline", "baseline")
TAPT = Fit("tapt", "tapt", exports=True)
MT = Fit("mt_tartan", "mt_tartan")
META = Fit("meta_tartan", "meta_tartan")
HEAD_WARMUP = Fit("mlm_head_warmup", "mlm_head_warmup", exports=True)

#: method -> the fit whose model is tested; its lineage is the method's chain
METHODS: dict[str, Fit] = {
    "fine_tuning": BASELINE,
    "tapt_fine_tuning": Fit("tapt_finetune", "tapt_finetune", encoder_from=TAPT),
    "mt_tartan": MT,
    "mt_tartan_posthoc": posthoc(MT),
    "meta_tartan": META,
    "meta_tartan_posthoc": posthoc(META),
    "meta_tartan_in_sample": Fit("meta_tartan_in_sample", "meta_tartan", args=("--model.dev_gradient=in_sample",)),
    "meta_tartan_head_warmup": Fit("meta_tartan_head_warmup", "meta_tartan", encoder_from=HEAD_WARMUP),
    "mt_tartan_head_warmup": Fit("mt_tartan_head_warmup", "mt_tartan", encoder_from=HEAD_WARMUP),
    # MT-TARTAN's learning rates, schedule, batches and budget on the end task alone: what the MLM objective adds
    "mt_recipe_end_task_only": Fit(
        "mt_recipe_end_task_only", "mt_tartan", args=("--model.weighting=none", "--data.init_args.aux_corpora={}")
    ),
}
DEFAULT_METHODS = [
    "fine_tuning", "tapt_fine_tuning", "mt_tartan", "mt_tartan_posthoc", "meta_tartan", "meta_tartan_posthoc"
]
DEFAULT_TASKS = ["citation_intent", "sciie"]
DEFAULT_SEEDS = [0, 1, 2]
STAGE_CONFIGS = {fit.config for final in METHODS.values() for fit in final.lineage()}


@dataclass(frozen=True)
class Step:
    """A stage of a chain: a fit, or the test of a fit's chosen checkpoint."""

    fit: Fit
    test: bool = False

    @property
    def folder(self) -> str:
        return f"{self.fit.name}-test" if self.test else self.fit.name

    @property
    def needs(self) -> tuple[str, ...]:
        """Folders of the stages whose outputs this one reads."""
        return (self.fit.name,) if self.test else tuple(parent.name for parent in self.fit.parents)


def method_steps(method: str) -> list[Step]:
    final = METHODS[method]
    return [*map(Step, final.lineage()), Step(final, test=True)]


# ---- profiles ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A YAML file saying how big every run is: options for all `tartan` commands and per stage config."""

    name: str
    description: str
    encoder: str
    precision: str
    #: a Python package whose `get_model_path()` is a local copy of `encoder`, used when importable
    encoder_package: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)
    #: stage config name (or "test") -> options for that stage only, after `args`
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def options(self, stage: str) -> list[str]:
        merged = {**self.args, **self.stages.get(stage, {})}
        return [f"--trainer.precision={self.precision}"] + [option(key, value) for key, value in merged.items()]


def load_profile(path: Path) -> Profile:
    raw = yaml.safe_load(path.read_text())
    profile = Profile(**raw)
    unknown = set(profile.stages) - STAGE_CONFIGS - {"test"}
    if unknown:
        raise ValueError(f"{path}: stages {sorted(unknown)} are not stage configs ({sorted(STAGE_CONFIGS)}) or 'test'")
    return profile


def option(key: str, value: Any) -> str:
    """`--key=value` as the tartan CLI parses it: true/false/null and lists spelled as in JSON (and YAML)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def resolve_encoder(profile: Profile, override: Optional[str]) -> tuple[str, str]:
    """(name for the tables, what `--model.encoder_name_or_path` gets): a local copy when there is one."""
    if override:
        path = Path(override)
        return override, str(path.resolve()) if path.exists() else override
    if profile.encoder_package:
        try:
            package = importlib.import_module(profile.encoder_package)
        except ImportError:
            return profile.encoder, profile.encoder
        return profile.encoder, str(package.get_model_path())
    return profile.encoder, profile.encoder


def grid_settings(
    profile: Profile, encoder_name: str, encoder: str, data_root: Path, passthrough: tuple[str, ...]
) -> dict[str, Any]:
    """What every run in one output folder must share for its records to be one table's: what a stage computes,
    not which cells of the grid are asked for or how many run at once. Folders are compared resolved, and options
    after `--` as `--key=value` whichever way they were spelt."""
    shared = {
        "profile": {key: value for key, value in asdict(profile).items() if key != "description"},
        # a folder given with --encoder, resolved; the profile's encoder by name (its packaged copy's folder is
        # another on every machine)
        "encoder": encoder if Path(encoder).is_absolute() and encoder_name != profile.encoder else encoder_name,
        "data_root": str(data_root),
        "tartan_options": joined_options(passthrough),
    }
    return json.loads(json.dumps(shared))


def joined_options(options: tuple[str, ...]) -> list[str]:
    """`--key value` as `--key=value`, so two spellings of one option compare equal."""
    joined: list[str] = []
    for option in options:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and not option.startswith("--"):
            joined[-1] = f"{joined[-1]}={option}"
        else:
            joined.append(option)
    return joined


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so that a difference is named down to the option."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def claim_output_folder(out: Path, settings: dict[str, Any]) -> None:
    """Record the folder's settings; refuse a run whose stages would compute other things (another encoder, data,
    profile option or tartan option) once the folder holds a record, since its records would join those in one
    table. Before any record, a run's settings replace the last ones (a first try that failed on a typo, say)."""
    path = out / GRID_SETTINGS
    if not path.exists() or not any((out / "records").glob("*.json")):
        write_json(path, settings)
        return
    before, now = flatten(read_json(path)), flatten(settings)
    differences = [
        f"  {key}: {before.get(key, '(unset)')!r} there, {now.get(key, '(unset)')!r} now"
        for key in dict.fromkeys([*before, *now])
        if before.get(key) != now.get(key)
    ]
    if differences:
        raise SystemExit(
            f"--out {out} holds runs made with other settings ({path}):\n" + "\n".join(differences) + "\n"
            "Rerun with the same profile, --encoder, --data-root and options after `--`, or give another --out (or "
            "delete this folder's records/ to start its table over)."
        )


# ---- the plan: chains of stages per (task, seed, family) ---------------------------------------------------


@dataclass(frozen=True)
class Chain:
    task: str
    seed: int
    methods: tuple[str, ...]
    steps: tuple[Step, ...]

    @property
    def label(self) -> str:
        return f"{self.task}/seed{self.seed}"


def record_path(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "records" / f"{task}-{method}-seed{seed}.json"


def families(methods: list[str]) -> list[list[str]]:
    """Methods that share a stage, directly or through another method, are one family (one chain)."""
    groups: list[list[str]] = []
    for method in methods:
        steps = set(method_steps(method))
        overlapping = [group for group in groups if steps & {s for m in group for s in method_steps(m)}]
        groups = [group for group in groups if group not in overlapping]
        groups.append([m for group in overlapping for m in group] + [method])
    return sorted(groups, key=lambda group: methods.index(group[0]))


def plan(tasks: list[str], methods: list[str], seeds: list[int], out: Path) -> list[Chain]:
    """The chains still to run, seed-major so that a partial grid has whole seeds; recorded methods drop out."""
    chains = []
    for seed in seeds:
        for task in tasks:
            pending = [method for method in methods if not record_path(out, task, method, seed).exists()]
            for family in families(pending):
                steps = dict.fromkeys(step for method in family for step in method_steps(method))
                chains.append(Chain(task, seed, tuple(family), tuple(steps)))
    return chains


# ---- running stages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a stage command depends on besides its chain and step."""

    profile: Profile
    encoder_name: str
    encoder: str
    data_root: Path
    out: Path
    passthrough: tuple[str, ...]
    tartan: str
    jobs: int
    gpus: tuple[int, ...]
    threads_per_job: int
    hardware: str
    command_line: str

    def stage_dir(self, chain: Chain, step: Step) -> Path:
        return self.out / chain.task / f"seed{chain.seed}" / step.folder


@dataclass(frozen=True)
class Failure:
    """A stage (or record) that did not finish; the summary shows the tail of its log."""

    stage: str
    reason: str
    log: Optional[Path] = None

    def describe(self) -> str:
        text = f"FAILED {self.stage}: {self.reason}"
        if self.log is not None and self.log.exists():
            tail = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            text += f"\n  log: {self.log}\n" + "\n".join(f"    {line}" for line in tail)
        return text


@dataclass
class ChainOutcome:
    """Counts of stages run and skipped and of results recorded, and what stopped the chain, if anything."""

    ran: int = 0
    skipped: int = 0
    recorded: int = 0
    failure: Optional[Failure] = None


def tartan_script() -> str:
    """The installed console script next to this interpreter (a virtual environment), else on PATH."""
    script = shutil.which("tartan", path=str(Path(sys.executable).parent)) or shutil.which("tartan")
    if script is None:
        raise SystemExit("the `tartan` command is missing: pip install -e . in the repository root")
    return script


def logger_options(folder: Path) -> list[str]:
    """A CSV logger writing to `<folder>/logs`, so metrics.csv exists whatever loggers are installed."""
    return [
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={folder}",
        "--trainer.logger.name=",
        "--trainer.logger.version=logs",
    ]


def export_dir(settings: Settings, chain: Chain, fit: Fit) -> Path:
    return settings.stage_dir(chain, Step(fit)) / "export"


def encoder_of(settings: Settings, chain: Chain, fit: Fit) -> str:
    """An earlier stage's export, the encoder of the run a post-hoc fit starts from, or the grid's encoder."""
    if fit.encoder_from is not None:
        return str(export_dir(settings, chain, fit.encoder_from))
    if fit.init_from is not None:
        return encoder_of(settings, chain, fit.init_from)
    return settings.encoder


def fit_command(settings: Settings, chain: Chain, fit: Fit, folder: Path) -> list[str]:
    command = [settings.tartan, "fit", "--config", str(CONFIGS / "tasks" / f"{chain.task}.yaml")]
    command += ["--config", str(CONFIGS / "methods" / f"{fit.config}.yaml")]
    if fit.exports:
        command += ["--config", str(folder / "export_overlay.yaml")]
    command += settings.profile.options(fit.config)
    command += [f"--seed_everything={chain.seed}", *logger_options(folder)]
    command += [f"--checkpoint.dirpath={folder / 'checkpoints'}", "--checkpoint.filename=best"]
    command += [f"--data.init_args.data_dir={settings.data_root / chain.task}"]
    command += [f"--model.encoder_name_or_path={encoder_of(settings, chain, fit)}"]
    if fit.init_from is not None:
        start = settings.stage_dir(chain, Step(fit.init_from))
        command += [f"--model.init_checkpoint={start / 'checkpoints' / 'best.ckpt'}"]
    return [*command, *fit.args, *settings.passthrough]


def tested_checkpoint(fit_folder: Path, fit: Fit) -> Path:
    if fit.selects:
        return Path(read_json(fit_folder / "logs" / "posthoc_selection.json")["selected_checkpoint"])
    return fit_folder / "checkpoints" / "best.ckpt"


def test_command(settings: Settings, chain: Chain, fit: Fit, folder: Path) -> list[str]:
    """`tartan test` with the fit's saved config; its own log folder, since Lightning won't overwrite a config."""
    fit_folder = settings.stage_dir(chain, Step(fit))
    command = [settings.tartan, "test", "--config", str(fit_folder / "logs" / "config.yaml")]
    command += [f"--ckpt_path={tested_checkpoint(fit_folder, fit)}", *settings.profile.options("test")]
    command += [f"--seed_everything={chain.seed}", *logger_options(folder)]
    return [*command, *settings.passthrough]


def prepare_stage(settings: Settings, chain: Chain, step: Step, folder: Path) -> list[str]:
    """The stage's command, after writing what it reads from its own folder (an exporting fit's overlay)."""
    if step.test:
        return test_command(settings, chain, step.fit, folder)
    if step.fit.exports:
        config = CONFIGS / "methods" / f"{step.fit.config}.yaml"
        write_export_overlay(config, folder / "export", folder / "export_overlay.yaml")
    return fit_command(settings, chain, step.fit, folder)


def write_export_overlay(config: Path, export: Path, overlay: Path) -> None:
    """A second --config whose callbacks list replaces the config's, with each ExportEncoder aimed at `export`.

    A later config replaces a list rather than extending it, so every other callback is copied over unchanged.
    """
    trainer = yaml.safe_load(config.read_text())["trainer"]
    if isinstance(trainer, str):  # `trainer: ../trainer.yaml`
        trainer = yaml.safe_load((config.parent / trainer).read_text())
    callbacks = trainer.get("callbacks") or []
    exporters = [cb for cb in callbacks if cb["class_path"].endswith(".ExportEncoder")]
    if not exporters:
        raise ValueError(f"{config} has no ExportEncoder callback to redirect")
    for exporter in exporters:
        exporter["init_args"] = {**exporter.get("init_args", {}), "dirpath": str(export)}
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))


def missing_output(folder: Path, step: Step) -> Optional[str]:
    """What a successful stage should have written but did not, if anything."""
    logs = folder / "logs"
    expected = [logs / "metrics.csv"]
    if not step.test:
        expected.append(logs / "config.yaml")
        expected.append(folder / "export" / "config.json" if step.fit.exports else folder / "checkpoints" / "best.ckpt")
        if step.fit.selects:
            expected.append(logs / "posthoc_selection.json")
    missing = [str(path) for path in expected if not path.exists()]
    if missing:
        return "exited 0 but wrote no " + ", ".join(missing)
    if step.test and not any(key.startswith("test/") for key in read_metrics(logs / "metrics.csv")):
        return f"{logs / 'metrics.csv'} has no test metrics"
    return None


class Runner:
    """Runs chains on a pool of job slots; a slot is one concurrent stage, pinned to a GPU when there are GPUs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(settings.jobs):
            self.slots.put(slot)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.processes: set[subprocess.Popen] = set()

    def run(self, chains: list[Chain]) -> list[ChainOutcome]:
        """All chains; on Ctrl-C (or SIGTERM, see `__main__`) stop starting stages and end the running ones."""
        pool = ThreadPoolExecutor(max_workers=self.settings.jobs)
        futures = [pool.submit(self.run_chain, chain) for chain in chains]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            self.stop.set()
            with self.lock:
                for process in self.processes:
                    process.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def run_chain(self, chain: Chain) -> ChainOutcome:
        outcome = ChainOutcome()
        if self.stop.is_set():
            return outcome
        slot = self.slots.get()
        try:
            rerun: set[str] = set()
            for step in chain.steps:
                folder = self.settings.stage_dir(chain, step)
                label = f"{chain.label}/{step.folder}"
                if (folder / "done.json").exists() and not rerun.intersection(step.needs):
                    self.say(f"skip   {label} (finished earlier)")
                    outcome.skipped += 1
                else:
                    outcome.failure = self.run_step(chain, step, folder, slot)
                    if outcome.failure is not None or self.stop.is_set():
                        return outcome
                    outcome.ran += 1
                    rerun.add(step.folder)
                for method in chain.methods:
                    if method_steps(method)[-1] == step:
                        outcome.failure = self.write_record(chain, method)
                        if outcome.failure is not None:
                            return outcome
                        outcome.recorded += 1
            return outcome
        finally:
            self.slots.put(slot)

    def run_step(self, chain: Chain, step: Step, folder: Path, slot: int) -> Optional[Failure]:
        """Run one stage from an empty folder and mark it done; what an interrupted try left is removed first."""
        label = f"{chain.label}/{step.folder}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        try:
            command = prepare_stage(self.settings, chain, step, folder)
        except (OSError, KeyError, ValueError) as error:
            return Failure(label, f"could not build its command: {error!r}")
        self.say(f"start  {label} [{self.device(slot)}]")
        started = time.monotonic()
        returncode = self.execute(command, folder, slot)
        seconds = time.monotonic() - started
        if returncode is None or self.stop.is_set():
            return None
        problem = f"exit status {returncode}" if returncode != 0 else missing_output(folder, step)
        if problem is not None:
            self.say(f"FAILED {label} after {duration(seconds)}: {problem}")
            return Failure(label, problem, folder / "log.txt")
        marker = {"command": command, "cwd": str(folder), "seconds": seconds, "finished": utc_now(), "slot": slot}
        write_json(folder / "done.json", marker)
        self.say(f"done   {label} in {duration(seconds)}")
        return None

    def execute(self, command: list[str], folder: Path, slot: int) -> Optional[int]:
        """The command's exit status, its output in `<folder>/log.txt`; None when the grid is stopping."""
        with (folder / "log.txt").open("w") as log:
            log.write(f"$ cd {folder} && {shlex.join(command)}\n\n")
            log.flush()
            with self.lock:  # either Ctrl-C's terminate() sees this process or this sees the stop
                if self.stop.is_set():
                    return None
                env = self.env(slot)
                process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
                self.processes.add(process)
            returncode = process.wait()
            with self.lock:
                self.processes.discard(process)
        return returncode

    def device(self, slot: int) -> str:
        count = self.settings.threads_per_job
        threads = f"{count} CPU thread{'s' * (count != 1)}"
        gpus = self.settings.gpus
        return f"GPU {gpus[slot % len(gpus)]}, {threads}" if gpus else threads

    def env(self, slot: int) -> dict[str, str]:
        threads = str(self.settings.threads_per_job)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        if self.settings.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(self.settings.gpus[slot % len(self.settings.gpus)])
        return env

    def write_record(self, chain: Chain, method: str) -> Optional[Failure]:
        label = f"{chain.label}/{method}"
        try:
            record = build_record(self.settings, chain, method)
        except (OSError, KeyError, ValueError) as error:
            return Failure(label, f"could not read its results: {error!r}")
        write_json(record_path(self.settings.out, chain.task, method, chain.seed), record)
        self.say(f"record {label}: dev {record['dev_score']:.4f}, test {record['metric']} {record['test_score']:.4f}")
        return None

    def say(self, message: str) -> None:
        sys.stdout.write(f"{datetime.now():%H:%M:%S} {message}\n")
        sys.stdout.flush()


# ---- records -----------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a kill mid-write must not leave a marker or record that parses as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def read_metrics(path: Path) -> dict[str, list[float]]:
    """A Lightning metrics.csv as column -> its logged values, in order (empty cells skipped)."""
    columns: dict[str, list[float]] = {}
    with path.open(newline="") as stream:
        for row in csv.DictReader(stream):
            for key, value in row.items():
                if value:
                    columns.setdefault(key, []).append(float(value))
    return columns


def monitor_metric(fit_logs: Path) -> str:
    """The task's dev metric (`f1_macro`, or `accuracy` for ChemProt), as the data module gave it to the model."""
    return yaml.safe_load((fit_logs / "hparams.yaml").read_text())["monitor_metric"]


def task_weighting(metrics: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """META-TARTAN's mean gradient cosine with the dev gradient and final weight, per objective."""
    objectives = [key.removeprefix("train/cos_") for key in metrics if key.startswith("train/cos_")]
    return {
        "mean_cos": {name: statistics.fmean(metrics[f"train/cos_{name}"]) for name in objectives},
        "last_weight": {name: metrics[f"train/weight_{name}"][-1] for name in objectives},
    }


def dev_score(fit_logs: Path, fit: Fit, metric: str) -> float:
    """The dev score of the model that is tested: post-hoc fine-tuning's choice, else the fit's best evaluation."""
    if fit.selects:
        selection = read_json(fit_logs / "posthoc_selection.json")
        return selection[f"{selection['selected']}_score"]
    return max(read_metrics(fit_logs / "metrics.csv")[f"val/{metric}"])


def build_record(settings: Settings, chain: Chain, method: str) -> dict[str, Any]:
    """One (task, method, seed) result from its stage folders: dev score of the tested model, test scores."""
    steps = method_steps(method)
    final = METHODS[method]
    fit_logs = settings.stage_dir(chain, Step(final)) / "logs"
    metric = monitor_metric(fit_logs)
    test = read_metrics(settings.stage_dir(chain, Step(final, test=True)) / "logs" / "metrics.csv")
    markers = [read_json(settings.stage_dir(chain, step) / "done.json") for step in steps]
    record: dict[str, Any] = {
        "task": chain.task,
        "method": method,
        "seed": chain.seed,
        "metric": metric,
        "dev_score": dev_score(fit_logs, final, metric),
        # every dev evaluation of the tested fit, in order: whether it was still improving when it stopped
        "dev_evaluations": read_metrics(fit_logs / "metrics.csv")[f"val/{metric}"],
        "test_score": test[f"test/{metric}"][-1],
        "test_f1_macro": test["test/f1_macro"][-1],
        "test_accuracy": test["test/accuracy"][-1],
        "profile": settings.profile.name,
        "encoder": settings.encoder_name,
        "precision": settings.profile.precision,
        "hardware": settings.hardware,
        "date": utc_now(),
        "wall_seconds": round(sum(marker["seconds"] for marker in markers), 1),
        "grid_command": settings.command_line,
        "commands": [shlex.join(marker["command"]) for marker in markers],
    }
    if final.selects:
        selection = read_json(fit_logs / "posthoc_selection.json")
        record["selection"] = {key: selection[key] for key in ("selected", "start_score", "fine_tuned_score")}
    for fit in reversed(final.lineage()):
        metrics = read_metrics(settings.stage_dir(chain, Step(fit)) / "logs" / "metrics.csv")
        if any(key.startswith("train/cos_") for key in metrics):
            record["task_weighting"] = {"stage": fit.name, **task_weighting(metrics)}
            break
    return record


def load_records(out: Path) -> list[dict[str, Any]]:
    """All records, ordered by task, registry order of methods, seed."""
    records = [read_json(path) for path in (out / "records").glob("*.json")]
    return sorted(records, key=lambda r: (r["task"], method_rank(r["method"]), r["seed"]))


def method_rank(method: str) -> tuple[int, str]:
    """Registry order; methods no longer registered (in old records) go last."""
    order = list(METHODS)
    return (order.index(method) if method in order else len(order), method)


# ---- results tables ----------------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]]) -> Table:
    """task -> method -> test score of the task's metric over seeds: mean, sample sd (n - 1; None for n = 1), n."""
    scores: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        scores.setdefault((record["task"], record["method"]), []).append(record)
    table: Table = {}
    for (task, method), group in scores.items():
        values = [record["test_score"] for record in group]
        table.setdefault(task, {})[method] = {
            "metric": group[0]["metric"],
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "seeds": [record["seed"] for record in group],
        }
    return table


def describe_runs(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What produced the records: each distinct command, profile, encoder, precision, hardware; date range."""

    def distinct(key: str) -> list[Any]:
        return list(dict.fromkeys(record[key] for record in records))

    dates = sorted(record["date"] for record in records)
    return {
        "commands": distinct("grid_command"),
        "profiles": distinct("profile"),
        "encoders": distinct("encoder"),
        "precisions": distinct("precision"),
        "hardware": distinct("hardware"),
        "dates": [dates[0], dates[-1]],
        "records": len(records),
    }


def methods_in(table: Table) -> list[str]:
    return sorted({method for cells in table.values() for method in cells}, key=method_rank)


def percent(cell: dict[str, Any]) -> str:
    spread = "" if cell["sd"] is None else f" ± {100 * cell['sd']:.1f}"
    return f"{100 * cell['mean']:.1f}{spread} ({cell['n']})"


def markdown(table: Table, meta: dict[str, Any], paper: dict[str, dict[str, str]]) -> str:
    tasks = list(table)
    methods = methods_in(table)
    paper = {task: paper[task] for task in tasks if set(paper.get(task, {})) & set(methods)}  # a column with numbers
    header = ["Method"]
    for task in tasks:
        metric = next(iter(table[task].values()))["metric"]
        header.append(f"{task} ({metric})")
        if task in paper:
            header.append(f"{task}, paper")
    rows = []
    for method in methods:
        row = [method]
        for task in tasks:
            row.append(percent(table[task][method]) if method in table[task] else "–")
            if task in paper:
                row.append(paper[task].get(method, "–"))
        rows.append(row)
    lines = [
        "# Reproduction results",
        "",
        "Test score of each task's metric, in percent: mean ± sample standard deviation over seeds (number of",
        "seeds); the model tested is the one chosen on dev. Rebuilt from the records in `runs.json`.",
        "",
        *[f"- Command: `{command}`" for command in meta["commands"]],
        f"- Profile: {', '.join(meta['profiles'])}",
        f"- Encoder: {', '.join(meta['encoders'])}",
        f"- Precision: {', '.join(meta['precisions'])}",
        f"- Hardware: {'; '.join(meta['hardware'])}",
        f"- Dates (UTC): {meta['dates'][0]} to {meta['dates'][1]}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]
    return "\n".join(lines) + "\n"


def figure(table: Table, path: Path) -> None:
    """Grouped bars: one group per task, one bar per method, sample-sd error bars; rendered by Agg."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    tasks, methods = list(table), methods_in(table)
    width = 0.8 / len(methods)
    fig = Figure(figsize=(3.0 + 0.35 * len(tasks) * len(methods), 4.0))
    axes = fig.add_subplot()
    for index, method in enumerate(methods):
        offset = (index - (len(methods) - 1) / 2) * width
        cells = [(position, table[task][method]) for position, task in enumerate(tasks) if method in table[task]]
        axes.bar(
            [position + offset for position, _ in cells],
            [100 * cell["mean"] for _, cell in cells],
            width,
            yerr=[100 * (cell["sd"] or 0.0) for _, cell in cells],
            capsize=3,
            label=method,
        )
    axes.set_xticks(range(len(tasks)))
    axes.set_xticklabels([f"{task}\n({next(iter(table[task].values()))['metric']})" for task in tasks])
    axes.set_ylabel("test score (%), mean ± sd over seeds")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(records: list[dict[str, Any]], results: Path) -> None:
    """runs.json (every record), results.json (mean/sd/n per task and method), results.md, results.png."""
    results.mkdir(parents=True, exist_ok=True)
    table = summarize(records)
    meta = describe_runs(records)
    paper = read_json(PAPER_RESULTS) if PAPER_RESULTS.exists() else {}
    write_json(results / "runs.json", records)
    write_json(results / "results.json", {"meta": meta, "results": table})
    (results / "results.md").write_text(markdown(table, meta, paper))
    figure(table, results / "results.png")


# ---- command line ------------------------------------------------------------------------------------------


def hardware(gpus: tuple[int, ...]) -> str:
    """The GPUs the stages run on, or the CPU model and core count."""
    import torch  # only when stages run: --aggregate-only stays light

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(gpu) for gpu in gpus or range(torch.cuda.device_count())]
        return ", ".join(f"{name} x{names.count(name)}" for name in dict.fromkeys(names))
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run tasks x methods x seeds through the shipped configs with `tartan`, then tabulate.",
        epilog="Options after a literal `--` are appended to every tartan command.",
    )
    parser.add_argument("--profile", type=Path, required=True, help="reproduce/profiles/{gpu,cpu,smoke}.yaml")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=TASKS, metavar="TASK",
                        help=f"default: {' '.join(DEFAULT_TASKS)}; any of: {' '.join(TASKS)} (configs/tasks/)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="METHOD",
                        help=f"default: {' '.join(DEFAULT_METHODS)}; any of: {' '.join(METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--jobs", type=int, default=1, help="stages running at once")
    parser.add_argument("--gpus", nargs="+", type=int, default=[], help="GPU ids, given to job slots round-robin")
    parser.add_argument("--threads-per-job", type=int, help="OMP/MKL threads per stage (default: cores // jobs)")
    parser.add_argument("--encoder", help="encoder of every stage that does not start from an earlier export")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "dsp",
                        help="folder holding one folder per task (default: ../shared/data/dsp)")
    parser.add_argument("--out", type=Path, help="run folders and records (default: runs/<profile name>)")
    parser.add_argument("--results", type=Path,
                        help="where the tables go (default: <out>/results; the published ones are in docs/results)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="rebuild the tables from existing records (or from --results' runs.json)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    args.methods = list(dict.fromkeys(args.methods))
    return args


def split_passthrough(argv: list[str]) -> tuple[list[str], tuple[str, ...]]:
    if "--" not in argv:
        return argv, ()
    cut = argv.index("--")
    return argv[:cut], tuple(argv[cut + 1 :])


def run_grid(
    args: argparse.Namespace, profile: Profile, out: Path, passthrough: tuple[str, ...], command_line: str
) -> int:
    """Run what is not finished yet; print a summary and return how many chains failed."""
    chains = plan(args.tasks, args.methods, args.seeds, out)
    total = len(args.tasks) * len(args.methods) * len(args.seeds)
    pending = sum(len(chain.methods) for chain in chains)
    print(f"{total - pending} of {total} (task, method, seed) results recorded earlier; {len(chains)} chains to run")
    if not chains:
        return 0
    encoder_name, encoder = resolve_encoder(profile, args.encoder)
    claim_output_folder(out, grid_settings(profile, encoder_name, encoder, args.data_root.resolve(), passthrough))
    gpus = tuple(args.gpus)
    settings = Settings(
        profile=profile,
        encoder_name=encoder_name,
        encoder=encoder,
        data_root=args.data_root.resolve(),
        out=out,
        passthrough=passthrough,
        tartan=tartan_script(),
        jobs=args.jobs,
        gpus=gpus,
        threads_per_job=args.threads_per_job or max(1, (os.cpu_count() or 1) // args.jobs),
        hardware=hardware(gpus),
        command_line=command_line,
    )
    outcomes = Runner(settings).run(chains)
    failures = [outcome.failure for outcome in outcomes if outcome.failure is not None]
    ran, skipped, recorded = (sum(getattr(o, key) for o in outcomes) for key in ("ran", "skipped", "recorded"))
    for failure in failures:
        print(failure.describe())
    print(f"summary: ran {ran} stages, skipped {skipped}, failed {len(failures)}; recorded {recorded} results")
    return len(failures)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_passthrough(argv)
    args = parse_args(own)
    try:
        profile = load_profile(args.profile)
    except (OSError, TypeError, ValueError) as error:
        raise SystemExit(f"--profile {args.profile}: {error}") from error
    out = (args.out or REPO / "runs" / profile.name).resolve()
    results = args.results or out / "results"
    command_line = shlex.join(["python", "reproduce/grid.py", *argv])
    try:
        failed = 0 if args.aggregate_only else run_grid(args, profile, out, passthrough, command_line)
    except KeyboardInterrupt:
        tabulate(out, results)  # what finished before the interrupt
        raise
    return 1 if tabulate(out, results, args.aggregate_only) == 0 or failed else 0


def tabulate(out: Path, results: Path, from_published: bool = False) -> int:
    """The tables rebuilt from every record under `out` (with `from_published`, where there is none, from the
    `runs.json` in `results`); the number of records."""
    records = load_records(out)
    published = results / "runs.json"
    if not records and from_published and published.is_file():
        records = sorted(read_json(published), key=lambda r: (r["task"], method_rank(r["method"]), r["seed"]))
        print(f"no records under {out / 'records'}: rebuilding from {published}")
    if not records:
        print(f"no records under {out / 'records'}: nothing to tabulate")
        return 0
    write_results(records, results)
    print(f"{len(records)} records -> {results / 'results.md'} (and runs.json, results.json, results.png)")
    return len(records)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the stages like Ctrl-C does
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the next run starts the unfinished stages again", file=sys.stderr)
        sys.exit(130)
