"""megatron-gdn: Gated DeltaNet as a first-class Megatron-core layer.

    megatron_gdn.GatedDeltaNet         the layer (megatron_gdn.layer)
    megatron_gdn.specs                 TransformerLayer specs (`--spec megatron_gdn.specs gdn_layer_spec`)
    megatron_gdn.kernels               Triton kernels and their torch paths (no Megatron import)
    megatron_gdn.cpu                   megatron-core on a machine without a GPU

The layer names are resolved lazily: `import megatron_gdn.kernels` must not import Megatron.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__all__ = ["GatedDeltaNet", "GatedDeltaNetSubmodules"]
# the checkout (or install) folder that holds megatron_gdn/ and, in a checkout, kernels/
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


def _map_source_tree_kernels() -> None:
    """setup.py installs the top-level folder kernels/ as megatron_gdn.kernels. When the package
    is used straight from a source checkout (repository root on PYTHONPATH, no install), map it
    here the same way; an installed package finds it through its own finder first."""
    name = __name__ + ".kernels"
    if name in _sys.modules:
        return
    folder = _os.path.join(_ROOT, "kernels")
    init = _os.path.join(folder, "__init__.py")
    # a source checkout (setup.py beside kernels/) keeps its own kernels even when an editable
    # install of another checkout (a git worktree's main tree) is on the path
    source_checkout = _os.path.isfile(init) and _os.path.isfile(_os.path.join(_ROOT, "setup.py"))
    if not source_checkout:
        return
    found = _importlib_util.find_spec(name)
    if found is not None and found.origin and _os.path.realpath(found.origin) == _os.path.realpath(init):
        return
    spec = _importlib_util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_map_source_tree_kernels()


class _InstalledKernelsFirst:
    """PyPI's top-level `kernels` (Hugging Face's kernel hub: a dependency of recent transformers,
    5.25 here, which imports it whenever it is installed) and this checkout's kernels/ folder
    share a name. With the repository root on sys.path (`python -m` or `-c` run from the root,
    PYTHONPATH on the GPU machines) the folder shadows the installed package and transformers
    fails to import. Our code imports the folder only as megatron_gdn.kernels, so the top-level
    name goes to an installed package where there is one, and to the folder otherwise."""

    root = _os.path.realpath(_ROOT)

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        from importlib.machinery import PathFinder

        others = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != cls.root]
        return PathFinder.find_spec(fullname, others)


if not any(getattr(f, "__name__", "") == "_InstalledKernelsFirst" for f in _sys.meta_path):
    _sys.meta_path.insert(0, _InstalledKernelsFirst)


def __getattr__(name):
    if name in __all__:
        from megatron_gdn import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'megatron_gdn' has no attribute {name!r}")
