"""Benchmarks: MS-Bench and DreamBench definitions, generation runs, scores and reports (`msdiff bench`)."""
