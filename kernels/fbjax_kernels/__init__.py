"""Attention kernels for fbjax: importable and testable without fbjax itself."""
