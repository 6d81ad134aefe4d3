"""The README.md (Hugging Face model card) of an exported end-task classifier: what it predicts and how it was made."""
from pathlib import Path
from typing import Mapping, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData

METHODS = {
    "none": "fine-tuning on the end task alone",
    "equal": "MT-TARTAN: the end task multitasked with masked-LM objectives, weighted equally",
    "meta": "META-TARTAN: the end task multitasked with masked-LM objectives, task weights meta-learned online",
    "aux_only": "the masked-LM objectives alone (the end-task head was not trained)",
}
PAPER = "https://arxiv.org/abs/2109.07437"


def end_task_model_card(
    *,
    encoder: str,
    label_names: Sequence[str],
    weighting: str,
    aux_objectives: Sequence[str],
    task_weights: Mapping[str, float],
    metrics: Optional[Mapping[str, float]] = None,
    task: Optional[str] = None,
) -> ModelCard:
    """A card naming the task, labels, method, the model's task weights and the metrics the caller measured.

    `encoder` is recorded as the Hub's `base_model` unless it is a local folder, which the Hub could not link to and
    which the card names by its folder's name alone: a card pushed to the Hub shows no path of the machine.
    """
    local = Path(encoder).expanduser().exists()
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        base_model=None if local else encoder,
        tags=["lightning-tartan", "tartan", "text-classification"],
    )
    start = f"the local encoder `{Path(encoder).expanduser().resolve().name}`" if local else f"`{encoder}`"
    title = f"{task} classifier" if task else "End-task classifier"
    lines = [
        f"# {title}",
        "",
        f"Trained with lightning-tartan by {METHODS.get(weighting, weighting)} "
        f"([Dery et al., 2022]({PAPER})), from {start}.",
        "",
        "## Labels",
        "",
        "| id | label |",
        "| ---: | --- |",
        *[f"| {index} | {name} |" for index, name in enumerate(label_names)],
        "",
        "## Training objectives",
        "",
        f"Auxiliary masked-LM objectives trained: {', '.join(f'`{name}`' for name in aux_objectives) or 'none'}.",
        "Task weights of this model (those of the checkpoint exported, e.g. the best on dev):",
        "",
        "| objective | weight |",
        "| --- | ---: |",
        *[f"| {name} | {weight:.4f} |" for name, weight in task_weights.items()],
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classifier = pipeline("text-classification", model="<this folder or Hub repo>")',
        'classifier(["a text to label"], truncation=True)  # cut at the training max_length, as in training',
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
