"""Small trained Qwen2-architecture models for tests, the demo and benchmarks."""
