"""megatron-gdn: Gated DeltaNet as a first-class Megatron-core layer.

    megatron_gdn.GatedDeltaNet         the layer (megatron_gdn.layer)
    megatron_gdn.specs                 TransformerLayer specs (`--spec megatron_gdn.specs gdn_layer_spec`)
    megatron_gdn.kernels               Triton kernels and their torch paths (no Megatron import)
    megatron_gdn.cpu                   megatron-core on a machine without a GPU

The layer names are resolved lazily: `import megatron_gdn.kernels` must not import Megatron.
"""
__all__ = ["GatedDeltaNet", "GatedDeltaNetSubmodules"]


def __getattr__(name):
    if name in __all__:
        from megatron_gdn import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'megatron_gdn' has no attribute {name!r}")
