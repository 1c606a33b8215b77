"""MEGATRON_GDN_AUTOTUNE: every autotuned kernel tries all its configs by default and exactly
one (its default, the first of the list) with the variable at 0. The choice is made when the
kernels are decorated, at import, so each case imports them in a child process, compiled mode
(TRITON_INTERPRET=0; decorating needs no GPU). The script is a file: @triton.jit reads the
source of what it decorates."""
import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json
import triton
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd, chunk_fwd
from megatron_gdn.kernels.utils.tuning import autotune_or_fixed

@autotune_or_fixed(configs=[triton.Config({"BV": bv}, num_warps=4) for bv in (16, 32, 64)],
                   key=["N"], interpret_config=triton.Config({"BV": 8}, num_warps=1))
@triton.jit
def toy(x, N, BV: triton.language.constexpr):
    pass

kernels = dict(toy=toy, **{name: getattr(mod, name) for mod, names in (
    (chunk_fwd, ("_prepare_kernel", "_state_kernel", "_output_kernel")),
    (chunk_bwd, ("_bwd_prep_kernel", "_bwd_dh_kernel",
                 "_bwd_grad_vq_kernel", "_bwd_grad_k_kernel"))) for name in names})
print(json.dumps({name: dict(autotuner=isinstance(k, triton.runtime.Autotuner),
                             configs=[str(c) for c in k.configs], fn=k.fn.__name__)
                  for name, k in kernels.items()}))
"""


SINGLE_CONFIG = {"_prepare_kernel"}


def _kernels(tmp_path, interpret="0", autotune=None):
    """{kernel name: {autotuner, configs, fn}} as imported with these variables."""
    script = tmp_path / "list_kernels.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    env.pop("MEGATRON_GDN_AUTOTUNE", None)
    if autotune is not None:
        env["MEGATRON_GDN_AUTOTUNE"] = autotune
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_autotune_by_default_one_config_when_off(tmp_path):
    tuned = _kernels(tmp_path)
    fixed = _kernels(tmp_path, autotune="0")
    assert tuned.keys() == fixed.keys()
    for name in tuned:
        assert tuned[name]["autotuner"], name
        # kernels whose list was cut to the H200 winner have one config either way
        if name not in SINGLE_CONFIG:
            assert len(tuned[name]["configs"]) > 1, (name, tuned[name]["configs"])
        # (listed twice where the kernel prunes: Triton prunes only lists of several)
        assert len(set(fixed[name]["configs"])) == 1, (name, fixed[name]["configs"])
        # the fixed config is the first of the tuned list, not the interpreter's
        assert fixed[name]["configs"][0] == tuned[name]["configs"][0], name
        assert fixed[name]["fn"] == tuned[name]["fn"] == name, name
    assert "BV: 16" in fixed["toy"]["configs"][0]


def test_autotune_explicit_on_matches_default(tmp_path):
    assert _kernels(tmp_path, autotune="1") == _kernels(tmp_path)


@pytest.mark.parametrize("value", ["false", "", "2"])
def test_autotune_bad_value_raises(value):
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_AUTOTUNE=value)
    result = subprocess.run([sys.executable, "-c", "import megatron_gdn.kernels.utils.tuning"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ValueError: MEGATRON_GDN_AUTOTUNE must be '0'" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("autotune", [None, "0"])
def test_interpreter_keeps_its_config(tmp_path, autotune):
    kernels = _kernels(tmp_path, interpret="1", autotune=autotune)
    assert all(len(k["configs"]) == 1 for k in kernels.values()), kernels
    assert "BV: 8" in kernels["toy"]["configs"][0], kernels["toy"]


def test_by_parallelism_keeps_the_class_configs(monkeypatch):
    import triton

    from megatron_gdn.kernels.utils import tuning
    from megatron_gdn.kernels.utils.tuning import by_parallelism

    # autotuning on: with MEGATRON_GDN_AUTOTUNE=0 (the GPU suite) the pruning keeps one config
    monkeypatch.setattr(tuning, "AUTOTUNE", True)

    narrow = [triton.Config({"BV": 16}, num_warps=4), triton.Config({"BV": 32}, num_warps=4)]
    wide = [triton.Config({"BV": 64}, num_warps=8)]
    prune = by_parallelism(narrow, wide)["early_config_prune"]
    assert prune(narrow + wide, {"PAR_CLASS": 0}) == narrow
    assert prune(narrow + wide, {"PAR_CLASS": 1}) == wide
    assert prune(narrow + wide, {"PAR_CLASS": 2}) == wide
    # a list without the class's configs (one fixed config) is left as it is
    assert prune(narrow[:1], {"PAR_CLASS": 2}) == narrow[:1]


_PRUNE_SCRIPT = """
import json
import torch
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd, chunk_fwd

def pick(kernel, dtype, K, par_class, **tensors):
    args = {name: torch.empty(1, dtype=dtype) for name in tensors}
    args["PAR_CLASS"] = par_class
    kept = kernel.early_config_prune(kernel.configs, args, BK=K)
    return [(c.kwargs["BV"], c.num_stages) for c in kept]

out = {}
for dtype, K in ((torch.float32, 256), (torch.bfloat16, 128), (torch.bfloat16, 256)):
    tag = f"{str(dtype)[6:]}-{K}"
    out["state-" + tag] = pick(chunk_fwd._state_kernel, dtype, K, 0, k=1, w=1, u=1)
    out["dh-" + tag] = pick(chunk_bwd._bwd_dh_kernel, dtype, K, 0, k=1, w=1, dv=1, dh=1)
print(json.dumps(out))
"""


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_sequential_passes_fit_shared_memory(tmp_path, autotune):
    """float32 inputs at K = 256: the pipelined tiles of the sequential passes' configs do not
    fit in 227 KB (the GPU run of 2026-11-27: 426,504 B required, with MEGATRON_GDN_AUTOTUNE=0);
    the pruning keeps what fits, else the first config at one stage, and one config when fixed."""
    script = tmp_path / "prune.py"
    script.write_text(_PRUNE_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_AUTOTUNE=autotune)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel in ("state", "dh"):
        assert all(stages == 1 for _, stages in out[f"{kernel}-float32-256"]), out
        assert out[f"{kernel}-float32-256"], out
        # bf16 at K = 128 keeps the pipelined default (first) config
        assert out[f"{kernel}-bfloat16-128"][0][1] > 1, out
        if autotune == "0":
            assert all(len(v) == 1 for v in out.values()), out
        else:
            assert len(out[f"{kernel}-bfloat16-128"]) > 1, out
