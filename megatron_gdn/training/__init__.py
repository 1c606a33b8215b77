"""Helpers behind `examples/pretrain_gdn.py`: Megatron pretraining with GDN layer specs.

    tokenizer.py   a byte-level tokenizer that needs no download, and Megatron's tokenizers
                   built from a few flags (for the preprocessing script)
    corpus.py      a small text corpus built from the Python standard library's sources
    data.py        train/valid/test datasets (indexed or mock) and the per-micro-batch batch
                   (TP broadcast, CP slicing)
    model.py       the model provider: GPTModel with GDN layers (flags or a YAML model file)
    args.py        the example's own flags, presets, and checks that run before any process
                   group exists
    throughput.py  model FLOPs per token, tokens/s and MFU logging
    multi_tensor.py  torch._foreach stand-ins for the per-tensor fallbacks Megatron's optimizer
                   step uses without TE and Apex (installed by the example and by run_script)
    wgrad_fusion.py  a stand-in for Apex's fused_weight_gradient_mlp_cuda (the weight gradient
                   accumulated into main_grad by the matmul), installed likewise on a GPU

Apart from those two installs, nothing here patches Megatron; on a machine without CUDA the
example calls `megatron_gdn.cpu.enable()` first.
"""
