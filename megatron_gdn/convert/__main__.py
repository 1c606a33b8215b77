"""Command line: convert checkpoints between Hugging Face-layout directories and megatron-gdn.

    python -m megatron_gdn.convert import-hf SRC_DIR OUT_DIR [--dist]
        SRC_DIR: config.json + *.safetensors (Qwen3NextForCausalLM, or fla's
        GatedDeltaNetForCausalLM); OUT_DIR gets model.yaml, convert.json, model_tp1.pt and,
        with --dist, a Megatron distributed checkpoint megatron/ loadable at any TP / PP.
    python -m megatron_gdn.convert export-hf CKPT_DIR OUT_DIR
        CKPT_DIR: a converted directory (as above); OUT_DIR gets config.json + model.safetensors
        in the format the checkpoint came from.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch

from megatron_gdn.convert import checkpoint_io
from megatron_gdn.convert.mapping import ConversionError

__all__ = ["main", "format_of", "load_hf_dir"]


def _formats():
    from megatron_gdn.convert import fla_gdn, qwen3_next

    return {m.MODEL_TYPE: m for m in (qwen3_next, fla_gdn)}


def format_of(config: Dict) -> object:
    """The format module for a config.json dict (by model_type, else by architecture)."""
    formats = _formats()
    if config.get("model_type") in formats:
        return formats[config["model_type"]]
    for module in formats.values():
        if module.ARCHITECTURE in (config.get("architectures") or []):
            return module
    raise ConversionError(
        f"config.json: model_type={config.get('model_type')!r}, architectures={config.get('architectures')!r}: "
        f"supported are {', '.join(m.ARCHITECTURE for m in formats.values())}")


def load_hf_dir(src) -> tuple:
    """(config dict, state dict) of a directory with config.json and safetensors / .bin files."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ValueError(f"src={str(src)!r}: no config.json")
    config = json.loads((src / "config.json").read_text())
    state: Dict[str, torch.Tensor] = {}
    files = sorted(src.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
    else:
        for f in sorted(src.glob("*.bin")):
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise ValueError(f"src={str(src)!r}: no *.safetensors or *.bin weight files")
    return config, state


def import_hf(src, out, dist: bool = False) -> Path:
    from megatron_gdn.hybrid import yaml_loader as yl

    config, state = load_hf_dir(src)
    fmt = format_of(config)
    doc, overrides = fmt.yaml_from_hf_config(fmt.read_hf_config(config))
    hm = yl.parse(doc, str(Path(out) / checkpoint_io.YAML_NAME))
    ours = fmt.to_megatron(hm, state)
    checkpoint_io.write(out, doc, overrides, ours, f"{fmt.ARCHITECTURE} ({src})")
    if dist:
        checkpoint_io.single_process()
        checkpoint_io.save_dist(out)
    return Path(out)


def export_hf(ckpt, out) -> Path:
    from safetensors.torch import save_file

    hm, _ = checkpoint_io.read(ckpt)
    meta = json.loads((Path(ckpt) / checkpoint_io.META_NAME).read_text())
    source = meta.get("source", "")
    fmt = next((m for m in _formats().values() if source.startswith(m.ARCHITECTURE)), None)
    if fmt is None:
        raise ConversionError(f"{ckpt}/convert.json: source {source!r} names no supported format")
    state = torch.load(Path(ckpt) / checkpoint_io.STATE_NAME, map_location="cpu", weights_only=True)
    tensors = fmt.to_hf_files(hm, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(fmt.hf_config_dict(hm), indent=2, default=str) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_gdn.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import-hf", help="Hugging Face-layout directory -> megatron-gdn directory")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dist", action="store_true", help="also write a Megatron distributed checkpoint")
    p = sub.add_parser("export-hf", help="megatron-gdn directory -> Hugging Face-layout directory")
    p.add_argument("ckpt")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "import-hf":
            print(f"wrote {import_hf(args.src, args.out, args.dist)}")
        else:
            print(f"wrote {export_hf(args.ckpt, args.out)}")
    except (ConversionError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
