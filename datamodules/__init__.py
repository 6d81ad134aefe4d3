"""Lightning data modules for the TARTAN end tasks (labeled splits + auxiliary MLM corpora + meta-dev)."""
from datamodules.base import DataFormatError, EndTaskDataModule
from datamodules.chemprot import ChemProtDataModule
from datamodules.citation_intent import CitationIntentDataModule
from datamodules.hyperpartisan import HyperPartisanDataModule
from datamodules.sciie import SciERCDataModule

__all__ = [
    "ChemProtDataModule",
    "CitationIntentDataModule",
    "DataFormatError",
    "EndTaskDataModule",
    "HyperPartisanDataModule",
    "SciERCDataModule",
]
