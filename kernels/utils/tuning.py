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
    keeps: all of them, or the single default (MEGATRON_GDN_AUTOTUNE=0 / interpreter). With a
    `prune_configs_by` under MEGATRON_GDN_AUTOTUNE=0 the default is listed twice: Triton prunes
    only lists of several configs, and the pruning (e.g. by_parallelism's shared-memory fit)
    must still see the launch; it returns one config there, so nothing is timed."""
    kept = select_configs(configs, interpret_config, default_index)
    if not INTERPRET and not AUTOTUNE and "prune_configs_by" in autotune_kwargs:
        kept = kept * 2
    return triton.autotune(configs=kept, key=key, **autotune_kwargs)


# H100 / H200: shared memory per block (opt-in maximum)
MAX_SHARED_BYTES = 227 * 1024


def by_parallelism(narrow, wide, shared_bytes=None):
    """`prune_configs_by` for the sequential passes: keep the `narrow` configs (small V blocks,
    more programs) when the launch's PAR_CLASS argument is 0 (few sequences x heads), the
    `wide` ones otherwise; halves what a new shape compiles and times. Configs are matched by
    identity, so pass the same objects that make up the kernel's config list.

    shared_bytes(config, named_args) -> estimated shared memory of a launch: configs above
    MAX_SHARED_BYTES are dropped (float32 inputs at K = 256 need three times the pipelined
    buffers of bf16 at K = 128); when none is left (also the one fixed config under
    MEGATRON_GDN_AUTOTUNE=0), the first with num_stages = 1."""
    narrow_ids, wide_ids = {id(c) for c in narrow}, {id(c) for c in wide}

    def prune(configs, named_args, **kwargs):
        keep = narrow_ids if named_args["PAR_CLASS"] == 0 else wide_ids
        kept = [c for c in configs if id(c) in keep] or list(configs)
        if shared_bytes is not None:
            args = {**named_args, **kwargs}
            fits = [c for c in kept if shared_bytes(c, args) <= MAX_SHARED_BYTES]
            c = kept[0]
            kept = fits or [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1)]
        # one fixed config (MEGATRON_GDN_AUTOTUNE=0): the first left, nothing timed
        return kept if AUTOTUNE else kept[:1]

    return {"early_config_prune": prune}
