"""Datasets, camera partitions, samplers, transforms and pose files."""
