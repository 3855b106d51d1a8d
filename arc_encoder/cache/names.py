"""The cache's option values (storage dtypes, corpus formats), apart from the format code.

Torch-free, so that the command line builds its parser (``arc-encoder --help``) without
importing torch; ``arc_encoder.cache.store`` uses the same names.
"""

from typing import Literal

StorageDtype = Literal["float16", "bfloat16", "float32", "int8"]
CorpusFormat = Literal["auto", "json", "parquet", "text"]
