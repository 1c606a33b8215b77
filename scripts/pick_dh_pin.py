"""The reverse state pass's pin to train with, from a dh sweep's log (scripts/gpu_dh_sweep.sh):
the fastest pin whose forward+backward beats the autotuned config's by more than 2% with every
gradient error within 1.5x of the autotuned config's. Prints it as MEGATRON_GDN_PIN's value,
or nothing (no log, no autotuned row, no pin that wins).

    python3 scripts/pick_dh_pin.py OUTDIR/dh-s4.log
"""
import json
import sys

ERRORS = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
# a pin's fields in order, as benchmarks/diag_configs.py's _config reads them (not imported:
# this script runs without triton)
FIELDS = ("BV", "num_warps", "num_stages", "ROW_SCALE", "maxnreg")


def results(lines):
    """[(pin, result dict)] in the log's order: a RESULT line belongs to the PIN line above."""
    out, pin = [], None
    for line in lines:
        if line.startswith("PIN "):
            pin = line.split("dh=", 1)[1].strip()
        elif line.startswith("RESULT ") and pin is not None:
            out.append((pin, json.loads(line[len("RESULT "):])))
            pin = None
    return out


def pick(rows):
    """The winning pin ('BV:warps:stages:ROW_SCALE[:maxnreg]') or None."""
    auto = dict(rows).get("auto")
    if not auto or "error" in auto:
        return None
    best, best_ms = None, auto["fwd_bwd_ms_median"] * 0.98
    for pin, r in rows:
        if pin == "auto" or "error" in r:
            continue
        exact = all(abs(r[e]) <= 1.5 * abs(auto[e]) + 1e-6 for e in ERRORS)
        if exact and r["fwd_bwd_ms_median"] < best_ms:
            best, best_ms = pin, r["fwd_bwd_ms_median"]
    return best


def as_env(pin: str) -> str:
    """'32:4:2:0' -> 'bwd_dh:BV=32,num_warps=4,num_stages=2,ROW_SCALE=0'."""
    return "bwd_dh:" + ",".join(f"{k}={v}" for k, v in zip(FIELDS, pin.split(":")))


def main(path):
    try:
        with open(path) as f:
            rows = results(f.read().splitlines())
    except OSError:
        return ""
    best = pick(rows)
    return as_env(best) if best else ""


if __name__ == "__main__":
    print(main(sys.argv[1]))
