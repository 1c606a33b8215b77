"""megatron_gdn.run_script: runs a training script as __main__ with the script's folder on
sys.path and (without a GPU) the CPU patches applied first."""
import subprocess
import sys
import textwrap



def test_runs_script_with_its_folder_and_arguments(tmp_path):
    (tmp_path / "neighbour.py").write_text("VALUE = 41\n")
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import sys
        import torch
        from neighbour import VALUE
        import megatron_gdn.cpu as cpu
        from megatron.core.optimizer import clip_grads
        from megatron.core import optimizer as core_optimizer
        from megatron_gdn.training import multi_tensor
        if __name__ == "__main__":
            patched = cpu._enabled or torch.cuda.is_available()
            print("OK", VALUE + 1, sys.argv[1:], patched)
            # the optimizer step's stand-ins are in before the script runs (no TE / Apex here)
            print("NORM", clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm)
            factory = core_optimizer._get_megatron_optimizer_based_on_param_groups
            print("ADAM", getattr(factory, "__megatron_gdn__", False))
    """))
    out = subprocess.run([sys.executable, "-m", "megatron_gdn.run_script", str(tmp_path / "train.py"),
                          "--spec", "megatron_gdn.specs", "gdn_layer_spec"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK 42 ['--spec', 'megatron_gdn.specs', 'gdn_layer_spec'] True" in out.stdout
    assert "NORM True" in out.stdout and "ADAM True" in out.stdout


def test_usage_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_gdn.run_script"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "usage" in (out.stdout + out.stderr)
    out = subprocess.run([sys.executable, "-m", "megatron_gdn.run_script", str(tmp_path / "no.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no such script" in (out.stdout + out.stderr)
