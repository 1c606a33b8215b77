"""MEGATRON_GDN_AUTOTUNE: every autotuned kernel tries all its configs by default and exactly
one (its default, the first of the list) with the variable at 0. The choice is made when the
kernels are decorated, at import, so each case imports them in a child process, compiled mode
(TRITON_INTERPRET=0; decorating needs no GPU). The script is a file: @triton.jit reads the
source of what it decorates."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

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
                             configs=[str(c) for c in k.configs], fn=k.fn.__name__,
                             cache=k.cache_results)
                  for name, k in kernels.items()}))
"""


SINGLE_CONFIG = {"_prepare_kernel"}


def _kernels(tmp_path, interpret="0", autotune=None, cache=None):
    """{kernel name: {autotuner, configs, fn, cache}} as imported with these variables."""
    script = tmp_path / "list_kernels.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    env.pop("MEGATRON_GDN_AUTOTUNE", None)
    if autotune is not None:
        env["MEGATRON_GDN_AUTOTUNE"] = autotune
    env.pop("MEGATRON_GDN_AUTOTUNE_CACHE", None)
    env.pop("TRITON_CACHE_AUTOTUNING", None)
    if cache is not None:
        env["MEGATRON_GDN_AUTOTUNE_CACHE"] = cache
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


def test_autotune_timings_cached_on_disk_unless_off(tmp_path):
    """Compiled, every autotuned kernel keeps its timings in Triton's disk cache by default;
    MEGATRON_GDN_AUTOTUNE_CACHE=0 turns that off; under the interpreter nothing is timed."""
    assert all(k["cache"] for k in _kernels(tmp_path).values())
    assert not any(k["cache"] for k in _kernels(tmp_path, cache="0").values())
    assert not any(k["cache"] for k in _kernels(tmp_path, interpret="1").values())
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_AUTOTUNE_CACHE="yes")
    result = subprocess.run([sys.executable, "-c", "import megatron_gdn.kernels.utils.tuning"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ValueError: MEGATRON_GDN_AUTOTUNE_CACHE must be '1'" in result.stderr, \
        result.stderr[-2000:]


@pytest.mark.parametrize("value", ["false", "", "2"])
def test_autotune_bad_value_raises(value):
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_AUTOTUNE=value)
    result = subprocess.run([sys.executable, "-c", "import megatron_gdn.kernels.utils.tuning"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ValueError: MEGATRON_GDN_AUTOTUNE must be '1' (autotune, the default) or '0'" in result.stderr, result.stderr[-2000:]


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


def test_by_parallelism_launches_pins_as_given(monkeypatch):
    """The shared-memory estimate cuts the lists' configs that do not fit to one stage, but
    not a config from outside the lists (a pin): that one is launched as given, once."""
    import triton

    from megatron_gdn.kernels.utils import tuning
    from megatron_gdn.kernels.utils.tuning import MAX_SHARED_BYTES, by_parallelism

    narrow = [triton.Config({"BV": 16}, num_warps=4, num_stages=2)]
    wide = [triton.Config({"BV": 64}, num_warps=8, num_stages=2)]
    prune = by_parallelism(narrow, wide, lambda c, args: MAX_SHARED_BYTES + 1)["early_config_prune"]
    pin = triton.Config({"BV": 64}, num_warps=8, num_stages=2)
    for autotune in (True, False):
        monkeypatch.setattr(tuning, "AUTOTUNE", autotune)
        (cut,) = prune(narrow + wide, {"PAR_CLASS": 1})
        assert (cut.kwargs, cut.num_stages) == ({"BV": 64}, 1)
        assert prune([pin, pin], {"PAR_CLASS": 1}) == [pin]
        assert prune([pin, pin], {"PAR_CLASS": 0}) == [pin]


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


# ---------------------------------------------------------------------------------------------
# MEGATRON_GDN_PIN: one config for the named kernels
# ---------------------------------------------------------------------------------------------

def test_parse_pins():
    from megatron_gdn.kernels.utils.tuning import parse_pins

    pins = parse_pins(" bwd_dh:BV=32,ROW_SCALE=0,num_warps=4,num_stages=2 ;"
                      "bwd_grad_k:BV=64,BK=64,num_warps=8,num_stages=1,maxnreg=128;")
    assert set(pins) == {"bwd_dh", "bwd_grad_k"}
    dh, gk = pins["bwd_dh"], pins["bwd_grad_k"]
    assert dh.kwargs == {"BV": 32, "ROW_SCALE": 0}
    assert (dh.num_warps, dh.num_stages, dh.maxnreg) == (4, 2, None)
    assert gk.kwargs == {"BV": 64, "BK": 64} and gk.maxnreg == 128
    assert parse_pins("") == {} and parse_pins(" ; ") == {}


@pytest.mark.parametrize("text, message", [
    ("dh:BV=32", "must be 'kernel:key=value,...'"),
    ("bwd_dh", "must be 'kernel:key=value,...'"),
    ("bwd_dh:BV=thirty", "'BV=thirty' of bwd_dh must be key=integer"),
    ("bwd_dh:BV", "'BV' of bwd_dh must be key=integer"),
    ("state:BV=16;state:BV=32", "state is pinned twice"),
])
def test_parse_pins_bad(text, message):
    from megatron_gdn.kernels.utils.tuning import parse_pins

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_pins(text)


def test_pin_names_are_the_tuned_kernels(tmp_path):
    from megatron_gdn.kernels.utils.tuning import PIN_NAMES, pin_name

    kernels = _kernels(tmp_path)
    names = {pin_name(SimpleNamespace(__name__=k["fn"])) for n, k in kernels.items()
             if n != "toy"}
    assert names == set(PIN_NAMES)


def test_pin_replaces_the_list(tmp_path, monkeypatch):
    """Compiled mode: the pinned kernels launch their pin alone (listed twice where the kernel
    prunes), with autotuning on or off; the others keep their lists."""
    pin = "bwd_dh:BV=32,ROW_SCALE=0,num_warps=4,num_stages=2;output:BV=64,num_warps=4,num_stages=2"
    tuned = _kernels(tmp_path)
    monkeypatch.setenv("MEGATRON_GDN_PIN", pin)
    for autotune in (None, "0"):
        pinned = _kernels(tmp_path, autotune=autotune)
        dh = pinned["_bwd_dh_kernel"]["configs"]
        assert len(dh) == 2 and len(set(dh)) == 1, dh
        assert "BV: 32" in dh[0] and "ROW_SCALE: 0" in dh[0] and "num_warps: 4" in dh[0], dh
        assert "num_stages: 2" in dh[0]
        out = pinned["_output_kernel"]["configs"]
        assert len(out) == 1 and "BV: 64" in out[0] and "num_stages: 2" in out[0], out
        if autotune is None:
            for name in ("_state_kernel", "_bwd_grad_vq_kernel", "toy"):
                assert pinned[name] == tuned[name], name


def test_pin_bad_value_raises():
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_PIN="bwd_dh:BV=x")
    result = subprocess.run([sys.executable, "-c", "import megatron_gdn.kernels.utils.tuning"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MEGATRON_GDN_PIN: 'BV=x' of bwd_dh must be key=integer" in result.stderr


_PINNED_RUN = """
import json
import torch
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd, chunk_gated_delta_rule
from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule

torch.manual_seed(0)
B, T, H, HV, K, V = 2, 100, 1, 2, 32, 32
q, k = (torch.randn(B, T, H, K) for _ in range(2))
k = torch.nn.functional.normalize(k, dim=-1)
v = torch.randn(B, T, HV, V)
g = -torch.rand(B, T, HV) * 0.3
beta = torch.rand(B, T, HV)
h0 = torch.randn(B, HV, K, V)
ins = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

def grads(fn):
    o, ht = fn(*ins[:5], initial_state=ins[5], output_final_state=True)
    gs = torch.autograd.grad((o * torch.cos(o)).sum() + (ht * ht).sum(), ins)
    return [o, ht, *gs]

ours = grads(chunk_gated_delta_rule)
ref = grads(naive_recurrent_gated_delta_rule)
err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))
print(json.dumps({"err": err, "dh": [str(c) for c in chunk_bwd._bwd_dh_kernel.configs]}))
"""


def test_pinned_dh_config_runs_exact(tmp_path):
    """Under the interpreter a pin replaces the interpreter's config: the reverse state pass at
    BV 16 with the key decay on the k operand (the interpreter's own runs BV 32, on the rows)
    crosses two V blocks and matches the naive recurrence in every gradient."""
    script = tmp_path / "pinned_run.py"
    script.write_text(_PINNED_RUN)
    env = dict(os.environ, TRITON_INTERPRET="1",
               MEGATRON_GDN_PIN="bwd_dh:BV=16,ROW_SCALE=0,num_warps=4,num_stages=1")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["dh"] and all("BV: 16" in c and "ROW_SCALE: 0" in c for c in out["dh"]), out
    assert out["err"] < 1e-4, out


def test_pick_dh_pin(tmp_path):
    """scripts/pick_dh_pin.py: the fastest pin as exact as the autotuned config, >2% faster;
    errors, failed pins and slower ones are passed over; nothing without an autotuned row."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    import pick_dh_pin

    def row(ms, dv=0.0035):
        return "RESULT " + json.dumps(dict(dq=0.0037, dk=0.0038, dv=dv, dg=0.003, dbeta=0.0031,
                                           dinitial_state=0.0029, fwd_bwd_ms_median=ms))

    log = tmp_path / "dh.log"
    lines = ["PIN S4 dh=auto", row(5.70), "PIN S4 dh=32:8:1:1", 'RESULT {"error": "illegal"}',
             "PIN S4 dh=64:4:2:0", row(4.0, dv=0.5), "PIN S4 dh=128:16:1:1:128", row(5.65),
             "PIN S4 dh=32:4:2:0", row(5.20), "PIN S4 dh=16:4:2:0", row(5.30)]
    log.write_text("\n".join(lines))
    assert pick_dh_pin.main(str(log)) == "bwd_dh:BV=32,num_warps=4,num_stages=2,ROW_SCALE=0"
    assert pick_dh_pin.as_env("128:16:1:1:128") == \
        "bwd_dh:BV=128,num_warps=16,num_stages=1,ROW_SCALE=1,maxnreg=128"
    log.write_text("\n".join(lines[:4] + lines[6:8]))  # none >2% faster
    assert pick_dh_pin.main(str(log)) == ""
    log.write_text("\n".join(lines[2:]))  # no autotuned row
    assert pick_dh_pin.main(str(log)) == ""
    assert pick_dh_pin.main(str(tmp_path / "missing.log")) == ""
    # what it prints parses as MEGATRON_GDN_PIN
    from megatron_gdn.kernels.utils.tuning import parse_pins
    assert parse_pins(pick_dh_pin.as_env("128:16:1:1:128"))["bwd_dh"].maxnreg == 128


@pytest.mark.parametrize("pin, message", [
    ("bwd_dh:BV=32,num_warps=4", "bwd_dh takes the meta-parameters BV, ROW_SCALE"),
    ("state:BW=32,num_warps=4", "state takes the meta-parameters BV (and launch options"),
    ("bwd_grad_k:BV=64,BK=64,BQ=1", "got BK, BQ, BV"),
])
def test_pin_with_other_meta_parameters_raises(pin, message):
    """A pin must name exactly the kernel's meta-parameters: a typo stops the import with the
    names the kernel takes, not a compile error at its first launch."""
    env = dict(os.environ, TRITON_INTERPRET="0", MEGATRON_GDN_PIN=pin)
    imports = "from megatron_gdn.kernels.gated_delta_rule import chunk_bwd, chunk_fwd"
    result = subprocess.run([sys.executable, "-c", imports], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
