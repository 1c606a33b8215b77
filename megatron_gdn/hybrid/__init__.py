"""Hybrid layer stacks: GDN, softmax attention (full, sliding window), Mamba2, MLP / MoE.

    attention.py     attention cores without Transformer Engine (SDPA / flex attention), CP
    specs.py         TransformerLayer specs for each mixer type
    yaml_loader.py   YAML model description -> TransformerConfig, block spec, GPTModel
"""
