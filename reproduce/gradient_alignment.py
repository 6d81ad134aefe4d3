"""How well META-TARTAN's dev gradient agrees with the objectives' gradients, for several ways of estimating it.

META-TARTAN moves a task's weight by cos(g_task, g_dev). If the estimate of g_dev is mostly noise, the weights
cannot learn anything; this measures the cosines META-TARTAN would see, on the same batches, for each estimator:

    python reproduce/gradient_alignment.py --task citation_intent \
        --out docs/results/gradient_alignment_citation_intent_start
    python reproduce/gradient_alignment.py --task citation_intent \
        --init-checkpoint runs/cpu/citation_intent/seed0/mt_tartan/checkpoints/best.ckpt \
        --out docs/results/gradient_alignment_citation_intent_after_mt

For each of `--batches` training batches it takes the gradient, over the encoder's parameters, of the end task's
loss and of each MLM objective's loss, and the dev gradient of every estimator, all at the same weights. As a
reference it also takes the dev loss's gradient through the model's own end-task head (what a dev gradient looks
like when the head is not a fresh, barely fitted one), and as yardsticks the cosine between the MLM and end-task
gradients of a batch and between the end-task gradients of consecutive batches (how much two honest gradient
samples of one objective agree). Writes `<out>.json` and `<out>.md`.
"""
import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from datamodules import CitationIntentDataModule, EndTaskDataModule, SciERCDataModule
from lightning_tartan import TartanModule
from lightning_tartan.weighting import END_TASK

REPO = Path(__file__).resolve().parents[1]
OWN_HEAD = "reference: dev loss through the model's own end-task head"
TASKS = {"citation_intent": CitationIntentDataModule, "sciie": SciERCDataModule}
#: estimator name -> TartanModule options for the dev head and dev gradient
ESTIMATORS = {
    "held_out, head fitted 10 steps (paper)": {"dev_gradient": "held_out"},
    "in_sample, head fitted 10 steps": {"dev_gradient": "in_sample"},
    "held_out, head fitted 100 steps": {"dev_gradient": "held_out", "dev_head_steps": 100, "dev_head_tolerance": 0.0},
    "in_sample, head fitted 100 steps": {"dev_gradient": "in_sample", "dev_head_steps": 100, "dev_head_tolerance": 0.0},
}


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def objective_gradient(module: TartanModule, name: str, batch: dict) -> torch.Tensor:
    params = list(module.encoder.parameters())
    loss = module.objective_loss(name, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flat([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])


def measure(
    encoder: str, data: EndTaskDataModule, batches: int, init_checkpoint: Optional[str], seed: int
) -> dict[str, dict[str, list[float]]]:
    """estimator -> objective -> the cosine on each batch; plus the end-task yardstick."""
    torch.manual_seed(seed)
    options = dict(num_labels=data.num_labels, aux_objectives=data.aux_names, weighting="meta", dropout=0.0)
    base = TartanModule(encoder, init_checkpoint=init_checkpoint, **options)
    estimators = {}
    for name, estimator_options in ESTIMATORS.items():
        module = TartanModule(encoder, **options, **estimator_options)
        module.load_state_dict(base.state_dict())
        estimators[name] = module
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    cosines: dict[str, dict[str, list[float]]] = {name: {} for name in [*ESTIMATORS, OWN_HEAD, "yardstick"]}
    previous_end_task = None
    for _ in range(batches):
        batch, _, _ = next(iterator)
        task_grads = {name: objective_gradient(base, name, batch) for name in base.objectives}
        devs = {name: flat(module.dev_gradient(batch)) for name, module in estimators.items()}
        # reference, not an estimator of the paper: the dev loss through the model's own end-task head
        own_head = {**batch, END_TASK: batch["meta_dev_grad"]}
        devs[OWN_HEAD] = objective_gradient(base, END_TASK, own_head)
        for name, dev in devs.items():
            for objective, grad in task_grads.items():
                cosines[name].setdefault(objective, []).append(cosine(grad, dev))
        yardstick = cosines["yardstick"]
        for aux in base.objectives[1:]:
            same_batch = cosine(task_grads[aux], task_grads[END_TASK])
            yardstick.setdefault(f"{aux} vs end_task, same batch", []).append(same_batch)
        if previous_end_task is not None:
            agreement = cosine(task_grads[END_TASK], previous_end_task)
            yardstick.setdefault("end_task vs the previous batch's end_task", []).append(agreement)
        previous_end_task = task_grads[END_TASK]
    return cosines


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.3f} ± {statistics.stdev(values):.3f}"


def markdown(cosines: dict[str, dict[str, list[float]]], meta: dict) -> str:
    objectives = list(next(iter(cosines.values())))
    lines = [
        "# Dev-gradient alignment",
        "",
        "Cosine between each objective's gradient and the dev gradient of each estimator, over the encoder's",
        "parameters, mean ± sd over training batches (the weights do not change between batches).",
        "",
        *[f"- {key}: {value}" for key, value in meta.items()],
        "",
        "| dev-gradient estimator | " + " | ".join(f"cos({name}, dev)" for name in objectives) + " |",
        "| --- | " + " | ".join("---:" for _ in objectives) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(summary(values[o]) for o in objectives) + " |"
        for name, values in cosines.items()
        if name != "yardstick"
    ]
    lines += ["", "Yardsticks:", ""]
    lines += [f"- cos({label}): {summary(values)}" for label, values in cosines["yardstick"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="citation_intent", choices=list(TASKS))
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "dsp")
    parser.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--init-checkpoint", help="a TartanModule checkpoint to measure at (default: the encoder)")
    parser.add_argument("--batches", type=int, default=20, help="at least 3: a spread needs 2 pairs of batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="<out>.json and <out>.md (default: runs/gradient_alignment_<task>)")
    args = parser.parse_args()
    if args.batches < 3:
        parser.error(f"--batches {args.batches}: at least 3 (the batch-to-batch yardstick's sd needs 2 pairs)")
    args.out = args.out or REPO / "runs" / f"gradient_alignment_{args.task}"

    torch.set_num_threads(1)
    data = TASKS[args.task](
        data_dir=str(args.data_root / args.task),
        tokenizer_name_or_path=args.encoder,
        aux_corpora={"tapt": "train.txt"},
        max_length=64, batch_size=16, aux_batch_size=16, dev_batch_size=16, dev_grad_batch_size=32, seed=args.seed,
    )
    cosines = measure(args.encoder, data, args.batches, args.init_checkpoint, args.seed)
    meta = {
        "task": args.task,
        "encoder": args.encoder,
        "weights": args.init_checkpoint or "the encoder as loaded, fresh heads",
        "batches": f"{args.batches} (16 end-task and 16 TAPT examples of 64 tokens; dev samples 16 and 32)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cosines": cosines}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(cosines, meta))
    print(markdown(cosines, meta))


if __name__ == "__main__":
    main()
