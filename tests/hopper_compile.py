"""Compile a Triton kernel for Hopper (sm_90) on a machine without a GPU, specialised as a
launch would be (non-constexpr pointer and integer arguments 16-divisible), and read what the
compiler reserved: `shared_bytes(kernel)` against `HOPPER_MAX_SHARED`.

Catches compiled-mode errors the interpreter lets through and block configurations that do
not fit in shared memory ("out of resource: shared memory" only shows at the first launch on
a GPU). Must run with TRITON_INTERPRET unset or 0: under the interpreter the kernels are
interpreter objects that cannot be compiled, so tests call it from a child process.
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# H100 / H200: 227 KB of shared memory per block (opt-in maximum), the bound the kernels'
# config pruning uses too
from megatron_gdn.kernels.utils.tuning import MAX_SHARED_BYTES as HOPPER_MAX_SHARED


def jit_function(fn):
    """The @triton.jit function under any @triton.autotune wrapper(s) (its arg_names)."""
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


# the index tables of packed sequences (int32 pointers)
I32_NAMES = ("cu_seqlens", "chunk_indices", "chunk_offsets")


def pointer_types(fn, f32, dtype="bf16", skip=lambda name: False):
    """compile_for_hopper's `pointers` for every argument of fn but those `skip` names (the
    scalars): "*fp32" for the names in f32, "*i32" for I32_NAMES, else "*{dtype}"."""
    return {n: "*fp32" if n in f32 else "*i32" if n in I32_NAMES else f"*{dtype}"
            for n in jit_function(fn).arg_names if not skip(n)}


def compile_for_hopper(fn, pointers, constexprs, num_warps, num_stages=1, floats=()):
    """fn: a @triton.jit function, or an @triton.autotune wrapper of one; pointers: argument
    name -> Triton pointer type ("*fp32", "*bf16", "*i32"); constexprs: name -> value;
    floats: names of float scalar arguments. Other arguments are taken as i32."""
    fn = jit_function(fn)
    # constants the kernel does not take are dropped (one dict can serve several kernels)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = pointers.get(name, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and name not in floats}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def shared_bytes(kernel) -> int:
    return kernel.metadata.shared


def ptxas_usage(kernel) -> dict:
    """Registers, stack, spill stores / loads per thread (bytes) and shared memory of a kernel
    compiled by compile_for_hopper, as the ptxas bundled with this Triton reports them for
    sm_90a."""
    import os
    import re
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stack, st, ld = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                       r"(\d+) bytes spill loads", out).groups())
    return dict(regs=regs, stack=stack, spill_st=st, spill_ld=ld, shared=shared_bytes(kernel))
