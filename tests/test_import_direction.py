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


def test_installed_top_level_kernels_is_not_shadowed_from_the_root():
    """Run from the repository root (`python -c` puts it first on sys.path), the top-level name
    `kernels` is PyPI's package where one is installed (transformers imports it; our folder
    shadowed it and every transformers import failed), and megatron_gdn.kernels stays ours."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no installed top-level `kernels` package to shadow")
    root = KERNELS.parent
    code = ("import megatron_gdn, kernels, megatron_gdn.kernels as ours\n"
            "print(kernels.__file__)\nprint(ours.__file__)\n"
            "import transformers.integrations.hub_kernels\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    top, ours = result.stdout.split()
    assert Path(top).resolve().parent != KERNELS and Path(ours).resolve().parent == KERNELS
