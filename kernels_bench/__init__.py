"""Benchmarks of spark_me's sparse encoders against dense computation."""
