"""HyperPartisan news (Kiesel et al., 2019): is a news article hyperpartisan, "true"/"false", macro-F1.

Articles are long, so they are truncated at 512 tokens. No domain corpus ships with the task; the TAPT corpus
(``train.txt``) is derived from the training articles into the cache when ``data_dir`` has none. The published dev
split holds one article with empty text (dev.jsonl line 22, id 432): it is kept, as an empty input, so the dev
metric is over every published example.
"""
from datamodules.base import EndTaskDataModule, dsp_urls


class HyperPartisanDataModule(EndTaskDataModule):
    default_aux_corpora = {"tapt": "train.txt"}
    default_max_length = 512
    default_monitor_metric = "f1_macro"
    urls = dsp_urls("hyperpartisan_news")
