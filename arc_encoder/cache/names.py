"""The cache's storage dtypes, apart from the format code.

Torch-free, so that the command lines build their parsers (``arc-encoder --help``) without
importing torch; ``arc_encoder.cache.format`` uses the same names.
"""

from typing import Literal

StorageDtype = Literal["float16", "bfloat16", "float32", "int8"]
