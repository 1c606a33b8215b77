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

`MEGATRON_GDN_PIN` pins named kernels to one config each, over all of the above (also under
the interpreter): nothing is timed for them, and a config outside a kernel's list (a sweep's
candidate) can be tried in a real run. Kernels by their function's name without the leading
underscore and the `_kernel` suffix (`PIN_NAMES`); ';' between kernels, launch options
(num_warps, num_stages, maxnreg) and the kernel's meta-parameters as key=integer (all of them
and no others: a pin that names other ones stops the import, listing the kernel's):

    MEGATRON_GDN_PIN="bwd_dh:BV=32,ROW_SCALE=0,num_warps=4,num_stages=2"

A pin is launched as given: the sequential passes' shared-memory estimate does not cut it (one
that does not fit fails at its first launch); the dk launch still clamps its BK to K.

The autotuned kernels keep their timings in Triton's on-disk cache (`TRITON_CACHE_DIR`,
`~/.triton/cache` by default), keyed by the kernel's source, its configs, the autotune key and
the GPU architecture: a later process on the same machine (a restarted training run, the
next benchmark) launches the tuned configs without timing them again.
`MEGATRON_GDN_AUTOTUNE_CACHE=0` times them in every process (e.g. where one cache directory is
shared by different cards of one architecture, H100 and H200).
"""
import os

import triton

AUTOTUNE_ENV = "MEGATRON_GDN_AUTOTUNE"
AUTOTUNE_CACHE_ENV = "MEGATRON_GDN_AUTOTUNE_CACHE"


def _switch(env: str, on: str, off: str) -> bool:
    """An on/off environment variable, '1' (the default) or '0'; ValueError for anything else,
    saying what each value does."""
    value = os.environ.get(env, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{env} must be '1' ({on}, the default) or '0' ({off}), got {value!r}")
    return value == "1"


PIN_ENV = "MEGATRON_GDN_PIN"
# the kernels decorated with autotune_or_fixed (tests/kernels/test_tuning.py checks the list)
PIN_NAMES = ("prepare", "state", "output", "bwd_prep", "bwd_dh", "bwd_grad_vq", "bwd_grad_k")
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def parse_pins(text: str) -> dict:
    """MEGATRON_GDN_PIN's value -> {kernel name: triton.Config}; ValueError naming what is
    wrong (an unknown kernel, a field that is not key=integer, a kernel pinned twice)."""
    pins = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, fields = part.partition(":")
        name = name.strip()
        if not sep or name not in PIN_NAMES:
            raise ValueError(f"{PIN_ENV}: {part!r} must be 'kernel:key=value,...' with a kernel "
                             f"among {', '.join(PIN_NAMES)}")
        if name in pins:
            raise ValueError(f"{PIN_ENV}: {name} is pinned twice")
        kwargs, options = {}, {}
        for field in filter(None, (f.strip() for f in fields.split(","))):
            key, eq, value = field.partition("=")
            key = key.strip()
            try:
                number = int(value)
            except ValueError:
                number = None
            if not eq or not key or number is None:
                raise ValueError(f"{PIN_ENV}: {field!r} of {name} must be key=integer")
            (options if key in _LAUNCH_OPTIONS else kwargs)[key] = number
        pins[name] = triton.Config(kwargs, **options)
    return pins


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = _switch(AUTOTUNE_ENV, "autotune", "one fixed config per kernel")
AUTOTUNE_CACHE = _switch(AUTOTUNE_CACHE_ENV, "keep autotune timings on disk",
                         "time the configs in every process")
PINS = parse_pins(os.environ.get(PIN_ENV, ""))


def pin_name(fn) -> str:
    """A jitted kernel's pin name: _bwd_dh_kernel -> bwd_dh."""
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    return name.removeprefix("_").removesuffix("_kernel")


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
    must still see the launch; it returns one config there, so nothing is timed. A kernel
    pinned by MEGATRON_GDN_PIN gets its pin alone (twice where it prunes). Timings go to
    Triton's disk cache unless MEGATRON_GDN_AUTOTUNE_CACHE=0 (module docstring)."""
    kept = select_configs(configs, interpret_config, default_index)

    def decorate(fn):
        configs_here = kept
        name = pin_name(fn)
        pin = PINS.get(name)
        if pin is not None:
            expected = sorted(configs[0].kwargs)
            if sorted(pin.kwargs) != expected:
                raise ValueError(f"{PIN_ENV}: {name} takes the meta-parameters "
                                 f"{', '.join(expected) or '(none)'} (and launch options "
                                 f"{', '.join(_LAUNCH_OPTIONS)}), got "
                                 f"{', '.join(sorted(pin.kwargs)) or '(none)'}")
            configs_here = [pin]
        if (pin is not None or not AUTOTUNE) and not INTERPRET \
                and "prune_configs_by" in autotune_kwargs:
            configs_here = configs_here * 2
        return triton.autotune(configs=configs_here, key=key, cache_results=AUTOTUNE_CACHE,
                               **autotune_kwargs)(fn)

    return decorate


# H100 / H200: shared memory per block (opt-in maximum)
MAX_SHARED_BYTES = 227 * 1024


def distinct(configs):
    """The configs, each object once (a pin listed twice is one), in order."""
    return list({id(c): c for c in configs}.values())


def by_parallelism(narrow, wide, shared_bytes=None):
    """`prune_configs_by` for the sequential passes: keep the `narrow` configs (small V blocks,
    more programs) when the launch's PAR_CLASS argument is 0 (few sequences x heads), the
    `wide` ones otherwise; halves what a new shape compiles and times. Configs are matched by
    identity, so pass the same objects that make up the kernel's config list.

    shared_bytes(config, named_args) -> estimated shared memory of a launch: configs above
    MAX_SHARED_BYTES are dropped (float32 inputs at K = 256 need three times the pipelined
    buffers of bf16 at K = 128); when none is left (also the one fixed config under
    MEGATRON_GDN_AUTOTUNE=0), the first with num_stages = 1. The estimate errs high (the wide
    dh launch at K 256 / V 512, BV 64, two stages: 234 KB estimated, 188.7 KB by ptxas), so
    configs from outside both lists (MEGATRON_GDN_PIN, a sweep's pins) skip it and are
    launched as given: one that does not fit fails at its launch (Triton's out-of-resources
    error)."""
    narrow_ids, wide_ids = {id(c) for c in narrow}, {id(c) for c in wide}

    def prune(configs, named_args, **kwargs):
        if not any(id(c) in narrow_ids or id(c) in wide_ids for c in configs):
            pinned = distinct(configs)
            return pinned if AUTOTUNE else pinned[:1]
        keep = narrow_ids if named_args["PAR_CLASS"] == 0 else wide_ids
        kept = [c for c in configs if id(c) in keep] or list(configs)
        if shared_bytes is not None:
            args = {**named_args, **kwargs}
            fits = [c for c in kept if shared_bytes(c, args) <= MAX_SHARED_BYTES]
            c = kept[0]
            kept = fits or [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1,
                                          maxnreg=c.maxnreg)]
        # one fixed config (MEGATRON_GDN_AUTOTUNE=0): the first left, nothing timed
        kept = distinct(kept)
        return kept if AUTOTUNE else kept[:1]

    return {"early_config_prune": prune}
