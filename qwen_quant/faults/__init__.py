"""Deliberate damage, seeded: faults planted in copies of artifacts (`plant`, `gguf`) to show the gate
catches them, and the function-preserving outlier transform (`outliers`) that makes hard fixtures."""
