"""Analysis tools: effective receptive fields, FLOPs, throughput."""
