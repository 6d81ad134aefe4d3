"""ChemProt chemical-protein relations (Kringelum et al., 2016): 13 classes over biomedical abstracts.

The literature reports micro-F1, which for single-label classification equals accuracy.
"""
from datamodules.base import EndTaskDataModule, dsp_urls


class ChemProtDataModule(EndTaskDataModule):
    default_aux_corpora = {"tapt": "train.txt", "dapt": "domain.1xTAPT.txt"}
    default_monitor_metric = "accuracy"
    urls = dsp_urls("chemprot")
