"""SciERC relation classification (Luan et al., 2018): 7 relations between marked CS entities, macro-F1.

"Don't Stop Pretraining" publishes it as ``sciie``, which is the folder name expected under ``data_dir``.
"""
from datamodules.base import EndTaskDataModule, dsp_urls


class SciERCDataModule(EndTaskDataModule):
    default_aux_corpora = {"tapt": "train.txt", "dapt": "domain.1xTAPT.txt"}
    default_monitor_metric = "f1_macro"
    urls = dsp_urls("sciie")
