"""Run megatron-core (and megatron.training) on a machine without a GPU, over gloo.

Megatron assumes a CUDA device everywhere: it asks `torch.cuda.current_device()` for the
device of every buffer, keeps its RNG streams in CUDA generators, allocates scratch tensors
with `device="cuda"`, orders work with CUDA streams and events, and asserts CUDA tensor type
names. `enable()` makes all of that resolve to the CPU so that the same Megatron code paths
(tensor, sequence and pipeline parallel, DDP, finalize_model_grads, the optimizer, the pipeline
schedules and `megatron.training.pretrain`) run in several CPU processes with gloo. That is
what lets the distributed tests compare a sharded run against one process on any machine.

Every patch lives in this module, says what breaks and why, and is applied once. `enable()`
does nothing when a CUDA device is present: on a GPU machine Megatron runs unmodified.

Usage (before building a model or initialising Megatron's parallel state):

    import megatron_gdn.cpu
    megatron_gdn.cpu.enable()
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import time
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable", "is_enabled", "TorchNorm"]

_lock = threading.Lock()
_enabled = False
_CPU = torch.device("cpu")


def is_enabled() -> bool:
    """True once `enable()` has patched Megatron for the CPU (never on a CUDA machine)."""
    return _enabled


def enable() -> bool:
    """Patch torch.cuda entry points and Megatron for CPU + gloo; idempotent.

    Returns True when the CPU patches are active, False when a CUDA device is present (then
    nothing is changed).
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        _patch_torch_cuda()
        _install_device_mode()
        _patch_megatron_core()
        _patch_megatron_training()
        _enabled = True
    return True


def use_shipped_dataset_helpers() -> None:
    """Megatron's `_compile_dependencies` runs `make -C megatron/core/datasets`, but the
    megatron-core wheel ships the built helpers_cpp extension and no Makefile, so the make
    fails and training stops (on a GPU as on the CPU). Compile only when the extension is
    missing. Idempotent; needed by any Megatron training script run from the wheel."""
    from megatron.training import initialize

    if getattr(initialize._compile_dependencies, "_megatron_gdn", False):
        return
    orig_compile = initialize._compile_dependencies

    @functools.wraps(orig_compile)
    def _compile_dependencies():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return orig_compile()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    _compile_dependencies._megatron_gdn = True
    initialize._compile_dependencies = _compile_dependencies


# --------------------------------------------------------------------------------------------
# torch.cuda: device queries, streams, events, RNG
# --------------------------------------------------------------------------------------------


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is already in program order."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuEvent:
    """Stand-in for torch.cuda.Event; timing events measure host wall time."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        if self._t is None or end._t is None:
            return 0.0
        return (end._t - self._t) * 1000.0


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _patch_torch_cuda():
    cuda = torch.cuda
    # ~140 Megatron sites pass torch.cuda.current_device() as the device of a new tensor.
    cuda.current_device = lambda: _CPU
    # Called after barriers and around timers; CPU ops are synchronous.
    cuda.synchronize = _noop
    # DDP's grad buffers, p2p communication and timers order work with streams and events.
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.default_stream = lambda device=None: _CpuStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # The rerun state machine saves and restores the device RNG every step, and activation
    # recomputation does the same: on the CPU the "device" generator is the CPU generator
    # (the one dropout draws from). torch.cuda.manual_seed stays a queued no-op so that
    # Megatron's seeding does not reset the CPU stream that initialises master weights.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    # Memory statistics reported by training logs and the memory buffer code.
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(cuda, name, _zero)
    cuda.reset_peak_memory_stats = _noop
    cuda.reset_max_memory_allocated = _noop
    cuda.empty_cache = _noop
    cuda.memory_stats = lambda device=None: {}
    # nvtx ranges are emitted around schedule steps; without the CUDA runtime they raise.
    cuda.nvtx = types.SimpleNamespace(
        range_push=_zero,
        range_pop=_zero,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=_noop,
    )


def _to_cpu_device(device):
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    # a bare int is a CUDA ordinal
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments of torch calls to the CPU.

    Megatron core and training allocate with `device="cuda"`, call `.cuda()` and
    `.to("cuda")`, pin memory, and check `tensor.type() == "torch.cuda.FloatTensor"` (clip_grads,
    the mixed-precision and distributed optimizers). Patching each site is brittle (hundreds
    of them), so this mode, entered once and never left (the same mechanism as
    `torch.set_default_device`), rewrites those calls: devices become CPU, `.cuda()` and
    `.pin_memory()` return the tensor itself, `pin_memory=True` is dropped and `.type()` on a
    CPU tensor reports the CUDA name of its dtype. It is active on the thread that called
    `enable()` (the mode stack is thread-local).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        return func(*args, **kwargs)


def _install_device_mode():
    _CudaToCpuMode().__enter__()


# --------------------------------------------------------------------------------------------
# megatron.core
# --------------------------------------------------------------------------------------------


def _patch_megatron_core():
    try:
        importlib.import_module("megatron.core")
    except ImportError:
        return
    _patch_rng_tracker()
    _patch_torch_norm()
    _patch_rope_cp_index()
    _patch_gloo_avg()


def _patch_rng_tracker():
    """CudaRNGStatesTracker keeps named CUDA generator states and swaps them in `fork`.

    On the CPU the named states are CPU generator states swapped into the CPU default
    generator: dropout inside a tensor-parallel region and the GPU-style per-rank weight
    initialisation then draw from the tracker stream as they would on a GPU.
    """
    from megatron.core.tensor_parallel import random as mp_random

    base = mp_random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = saved
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    saved = self.states_[outer_name]
                torch.set_rng_state(saved)
                self._current_state_name = outer_name

    CpuRNGStatesTracker.__name__ = "CpuRNGStatesTracker"
    CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    # initialize_rng_tracker looks the class up by this module-global name at call time.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # activation recomputation (CheckpointFunction) saves/restores through these helpers,
    # which reach for torch.cuda.default_generators.
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    mp_random.initialize_rng_tracker(force_reset=True)


class TorchNorm:
    """Builds torch.nn.LayerNorm / RMSNorm for a TransformerConfig, sequence parallel included.

    Megatron's WrappedTorchNorm (the local spec's norm without apex/TE) refuses sequence
    parallel because its parameters are not marked: with SP every TP rank normalises a
    different slice of the sequence, so the norm weights' gradients are partial sums that
    `finalize_model_grads` must all-reduce over the TP group; it does so for parameters that
    carry `sequence_parallel = True`. This builder sets that attribute from the config. Same
    call signature as WrappedTorchNorm, so it can be used in a ModuleSpec.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma=True is not supported by TorchNorm")
        if config.memory_efficient_layer_norm:
            raise ValueError("memory_efficient_layer_norm=True is not supported by TorchNorm")
        if config.persist_layer_norm:
            # a kernel choice of apex's fused norm; megatron.training turns it on by default
            warnings.warn("persist_layer_norm=True is ignored by TorchNorm", stacklevel=2)
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"config.normalization={config.normalization!r}: TorchNorm supports "
                "'LayerNorm' and 'RMSNorm'"
            )
        if config.params_dtype is not None:
            norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def _patch_torch_norm():
    """Route WrappedTorchNorm through TorchNorm so the local GPT spec works with SP.

    The spec modules bind the class object at import, so its `__new__` is replaced in place.
    persist_layer_norm is a fused-kernel option that a torch norm ignores.
    """
    from megatron.core.transformer import torch_norm

    def _new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
             zero_centered_gamma=False, normalization="LayerNorm"):
        return TorchNorm(config, hidden_size, eps)

    torch_norm.WrappedTorchNorm.__new__ = _new


def _cp_rank_pieces(pos_emb, seq_dim, cp_group):
    """Select pieces r and 2W-1-r of pos_emb along seq_dim (Megatron's load-balanced CP layout)."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size = cp_group.size()
    cp_rank = cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pieces = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pieces = pieces.index_select(seq_dim, index)
    return pieces.view(*pieces.shape[:seq_dim], -1, *pieces.shape[seq_dim + 2:])


def _patch_rope_cp_index():
    """get_pos_emb_on_this_cp_rank builds its index with pin_memory=True and `.cuda()`.

    Replaced in rope_utils and in the modules that imported it by name.
    """
    for mod_name in (
        "megatron.core.models.common.embeddings.rope_utils",
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    ):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = _cp_rank_pieces


def _patch_gloo_avg():
    """gloo has no ReduceOp.AVG; Megatron uses it for TP-averaged grads and DDP's
    `average_in_collective`. A SUM followed by a division by the group size replaces it."""
    dist = torch.distributed
    if getattr(dist.all_reduce, "_megatron_gdn_cpu", False):
        return
    orig_all_reduce = dist.all_reduce
    orig_reduce_scatter = dist.reduce_scatter_tensor

    def _is_avg(op):
        return op == dist.ReduceOp.AVG

    @functools.wraps(orig_all_reduce)
    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_avg(op):
            return orig_all_reduce(tensor, op=op, group=group, async_op=async_op)
        work = orig_all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=False)
        tensor.div_(dist.get_world_size(group))
        return _DoneWork() if async_op else work

    @functools.wraps(orig_reduce_scatter)
    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_avg(op):
            return orig_reduce_scatter(output, input, op=op, group=group, async_op=async_op)
        work = orig_reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=group,
                                   async_op=False)
        output.div_(dist.get_world_size(group))
        return _DoneWork() if async_op else work

    all_reduce._megatron_gdn_cpu = True
    reduce_scatter_tensor._megatron_gdn_cpu = True
    dist.all_reduce = all_reduce
    dist.reduce_scatter_tensor = reduce_scatter_tensor


class _DoneWork:
    """A completed collective handle (returned when an async AVG was run synchronously)."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


# --------------------------------------------------------------------------------------------
# megatron.training (pretrain)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_visible_device():
    """initialize.py decides by `torch.cuda.device_count() > 0` whether to build Megatron's
    model-parallel groups and seed the RNG tracker; with 0 devices it silently skips both. Inside
    this context the count is 1 and `set_device` does nothing."""
    cuda = torch.cuda
    saved = cuda.device_count, cuda.set_device
    cuda.device_count = lambda: 1
    cuda.set_device = _noop
    try:
        yield
    finally:
        cuda.device_count, cuda.set_device = saved


def _patch_megatron_training():
    try:
        initialize = importlib.import_module("megatron.training.initialize")
        training = importlib.import_module("megatron.training.training")
        arguments = importlib.import_module("megatron.training.arguments")
    except ImportError:
        return

    # validate_args asks the compute capability (torch.cuda.get_device_properties) to decide
    # CUDA_DEVICE_MAX_CONNECTIONS advice and FSDP/GTP stream priorities; a CPU has none.
    arch = lambda: 0  # noqa: E731
    # ... and for architectures before Blackwell it then requires CUDA_DEVICE_MAX_CONNECTIONS=1
    # with TP or CP (a CUDA scheduling knob that means nothing on the CPU).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    arguments.get_device_arch_version = arch
    for mod_name in ("megatron.training.utils", "megatron.training.utils.common_utils"):
        mod = importlib.import_module(mod_name)
        if hasattr(mod, "get_device_arch_version"):
            mod.get_device_arch_version = arch

    # initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda is passed, and
    # pretrain does not pass it.
    orig_initialize_megatron = initialize.initialize_megatron

    @functools.wraps(orig_initialize_megatron)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return orig_initialize_megatron(*args, **kwargs)

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron

    # With 0 devices _initialize_distributed skips initialize_model_parallel and _set_random_seed
    # skips the RNG tracker; NCCL (the default backend) needs a GPU, so use gloo.
    orig_init_distributed = initialize._initialize_distributed

    @functools.wraps(orig_init_distributed)
    def _initialize_distributed(*args, **kwargs):
        from megatron.training.global_vars import get_args

        margs = get_args()
        if margs.distributed_backend == "nccl":
            margs.distributed_backend = "gloo"
        with _one_visible_device():
            return orig_init_distributed(*args, **kwargs)

    initialize._initialize_distributed = _initialize_distributed

    orig_set_random_seed = initialize._set_random_seed

    @functools.wraps(orig_set_random_seed)
    def _set_random_seed(*args, **kwargs):
        with _one_visible_device():
            return orig_set_random_seed(*args, **kwargs)

    initialize._set_random_seed = _set_random_seed

    use_shipped_dataset_helpers()

    # set_jit_fusion_options warms up the torch.compile'd fusions on "cuda" tensors; on the CPU
    # the fused functions compile on first use (or not at all when fusions are off).
    def set_jit_fusion_options(tp_size=None):
        return None

    initialize.set_jit_fusion_options = set_jit_fusion_options
    training.set_jit_fusion_options = set_jit_fusion_options
