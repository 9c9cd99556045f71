"""Benchmarks of djinnd (see README.md); run the scripts, nothing here is imported by djinnd."""
