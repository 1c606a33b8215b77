"""One import direction: `megatron_gdn.kernels` knows torch and triton only, never Megatron."""
import re
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
# `megatron` as a whole module name: `megatron_gdn` is our own package and allowed
MEGATRON_IMPORT = re.compile(r"^\s*(import|from)\s+megatron(\.|\s|$)", re.MULTILINE)


def test_importing_kernels_does_not_import_megatron():
    code = (
        "import sys\n"
        "import megatron_gdn.kernels\n"
        "import megatron_gdn.kernels.gated_delta_rule\n"
        "bad = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip()
    assert loaded == "", f"importing megatron_gdn.kernels loaded Megatron modules: {loaded}"


def test_no_kernel_file_mentions_megatron_imports():
    files = sorted(KERNELS.rglob("*.py"))
    assert files, f"no python files found under {KERNELS}"
    offenders = [str(f.relative_to(KERNELS.parent)) for f in files if MEGATRON_IMPORT.search(f.read_text())]
    assert not offenders, f"files under kernels/ import Megatron: {offenders}"


def test_pattern_catches_megatron_imports():
    """The check above can fail: the pattern matches Megatron imports and spares our own."""
    assert MEGATRON_IMPORT.search("from megatron.core import parallel_state")
    assert MEGATRON_IMPORT.search("    import megatron\n")
    assert not MEGATRON_IMPORT.search("from megatron_gdn.kernels import chunk_gated_delta_rule")
