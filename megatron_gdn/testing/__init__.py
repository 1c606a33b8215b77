"""Test support shared by the test suite and the examples: the multi-process harness."""
