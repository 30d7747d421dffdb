"""Serving and batch evaluation with Ray Serve + vLLM (see the evaluation issue)."""
