"""`arc-encoder` command line: ``main`` (entry point), ``cache``, ``eval``, ``plan``, ``probe`` and
``convert``. The argument groups they share with `arc-encoder-train` are ``arc_encoder.arguments``.

Nothing is imported here, so one command's module can be imported alone.
"""
