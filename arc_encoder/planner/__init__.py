"""The budget planner: model FLOP counts (``flops``) and the pooling/chunk choice (``plan``)."""
