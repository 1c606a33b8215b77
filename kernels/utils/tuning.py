"""One place that decides how many configs each `@triton.autotune` kernel tries.

- Compiled, default: every config of the kernel's list, timed per autotune key.
- Compiled with `MEGATRON_GDN_AUTOTUNE=0`: the list's default config only (the first unless a
  kernel says otherwise). Test runs at many shapes then compile each kernel once per shape
  instead of once per config, and skip the timing runs.
- Under the Triton interpreter (`TRITON_INTERPRET=1`): one config, the kernel's interpreter
  config when it has one, since autotuning over several configs fails there ("0 active
  drivers").

A single-config `triton.autotune` launches that config without benchmarking, and keeps the
`.fn` / `.configs` attributes that launchers, benchmarks and tests read. Both variables are
read once, at import, as Triton does with `TRITON_INTERPRET`: set them before importing the
kernels.
"""
import os

import triton

AUTOTUNE_ENV = "MEGATRON_GDN_AUTOTUNE"


def _autotune_enabled() -> bool:
    value = os.environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be '0' (one fixed config per kernel) or '1' "
                         f"(autotune, the default), got {value!r}")
    return value == "1"


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = _autotune_enabled()


def select_configs(configs, interpret_config=None, default_index=0):
    """The configs a kernel's autotuner gets (see the module docstring)."""
    if not 0 <= default_index < len(configs):
        raise ValueError(f"default_index must index the {len(configs)} configs, "
                         f"got {default_index}")
    if INTERPRET:
        return [configs[default_index] if interpret_config is None else interpret_config]
    if not AUTOTUNE:
        return [configs[default_index]]
    return list(configs)


def autotune_or_fixed(configs, key, interpret_config=None, default_index=0, **autotune_kwargs):
    """`triton.autotune(configs, key, **autotune_kwargs)` over the configs `select_configs`
    keeps: all of them, or the single default (MEGATRON_GDN_AUTOTUNE=0 / interpreter)."""
    return triton.autotune(configs=select_configs(configs, interpret_config, default_index),
                           key=key, **autotune_kwargs)


def by_parallelism(narrow, wide):
    """`prune_configs_by` for the sequential passes: keep the `narrow` configs (small V blocks,
    more programs) when the launch's PAR_CLASS argument is 0 (few sequences x heads), the
    `wide` ones otherwise; halves what a new shape compiles and times. Configs are matched by
    identity, so pass the same objects that make up the kernel's config list."""
    narrow_ids, wide_ids = {id(c) for c in narrow}, {id(c) for c in wide}

    def prune(configs, named_args, **kwargs):
        keep = narrow_ids if named_args["PAR_CLASS"] == 0 else wide_ids
        kept = [c for c in configs if id(c) in keep]
        return kept or list(configs)

    return {"early_config_prune": prune}
