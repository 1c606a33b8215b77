"""Run a Megatron-LM training script (e.g. its `pretrain_gpt.py`) with this package's layer
specs, on a GPU (without Transformer Engine: with `training.args.gpu_fallback_flags` added and
the training module's stand-ins installed, as examples/pretrain_gdn.py does), or on a CPU with
`megatron_gdn.cpu` applied first; either way Megatron's dataset helpers are taken from the wheel
instead of being compiled:

    torchrun --nproc_per_node 1 -m megatron_gdn.run_script MEGATRON_LM/pretrain_gpt.py \\
        --spec megatron_gdn.specs gdn_layer_spec ...

The script's own folder goes first on sys.path (Megatron-LM's scripts import their neighbours,
gpt_builders.py and model_provider.py). Nothing of Megatron-LM is shipped here.
"""
import os
import runpy
import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m megatron_gdn.run_script SCRIPT.py [script arguments]")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"no such script: {script}")
    import torch

    import megatron_gdn.cpu
    from megatron_gdn.training.args import gpu_fallback_flags, install_stand_ins

    megatron_gdn.cpu.enable()  # no-op with a CUDA device
    megatron_gdn.cpu.use_shipped_dataset_helpers()
    extra = gpu_fallback_flags(list(argv[1:])) if torch.cuda.is_available() else []
    # as examples/pretrain_gdn.py, before the script builds its model (the flags above count
    # on the weight-gradient stand-in where it works)
    install_stand_ins(torch.cuda.is_available())
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script] + list(argv[1:]) + extra
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
