"""Lightning training for arc-encoder (installed as `arc_encoder_train`)."""
