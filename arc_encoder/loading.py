"""Hugging Face loads without noise: no progress bars or load-report tables, real problems kept.

Every command loads a few small models; transformers draws a weight-loading bar for each
and, when the encoder is cut out of a causal LM, a table saying that the LM head was not
used (it never is). ``datasets`` draws a bar for every file it reads. The contexts here turn
those off for our own loads only and restore the caller's settings afterwards; weights that
a model expects but the files lack (or that have another shape) are still reported, as one
warning line.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No weight-loading bars and no load reports (errors still raise)."""
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No 'Generating train split' bars while ``datasets`` reads a local file, and no log lines
    of its own for a file it cannot parse: the caller raises one error naming the file."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 1)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def load_pretrained(auto_class: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(path, **kwargs)``, quietly.

    Weights in the files that the model does not use (a causal LM's head when only its
    backbone loads) are expected and ignored; weights the model needs but the files lack, or
    have with another shape, stay randomly initialised, so they are reported (``what`` names
    the model) as one warning.
    """
    with quiet_transformers():
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        warnings.warn(f"{what} {path}: weights left randomly initialised: missing {missing[:5]}"
                      f"{' ...' if len(missing) > 5 else ''}, other shape {mismatched[:5]}", stacklevel=2)
    return model
