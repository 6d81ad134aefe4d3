"""ACL-ARC citation intent (Jurgens et al., 2018): 6 classes over CS citation contexts, scored by macro-F1."""
from datamodules.base import EndTaskDataModule, dsp_urls


class CitationIntentDataModule(EndTaskDataModule):
    default_aux_corpora = {"tapt": "train.txt", "dapt": "domain.1xTAPT.txt"}
    default_monitor_metric = "f1_macro"
    urls = dsp_urls("citation_intent")
