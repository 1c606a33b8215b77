"""megatron_gdn.kernels: the local computation of Gated DeltaNet (torch + triton only).

Layout legend used across this package:
    B batch, T tokens, H key heads, HV value heads (HV % H == 0, GVA), K key dim, V value dim,
    N sequences (rows of the state; N == B, or len(cu_seqlens) - 1 for packed input).

This package must not import Megatron (a test enforces it).
"""
