"""`arc-encoder` command line: ``main`` (entry point), ``cache``, ``eval``, ``plan`` and ``common``
(device, dtype, decoder and adaptive-pooling arguments shared by every command).

Nothing is imported here, so a helper can import ``arc_encoder.cli.common`` alone.
"""
