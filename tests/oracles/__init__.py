"""Independent reference implementations used as test oracles (never import meshllm here)."""
