"""Backbone-only model files for inference, and their ONNX export.

``model.pt`` format (written by the trainer through :func:`save_backbone`)::

    {"backbone": name, "embedding_size": D, "state_dict": {...}, "config": {...}}

``config`` holds plain values only (str/int/float/bool/None, lists, dicts), so the file loads
with ``torch.load(weights_only=True)``; its ``"backbone_kwargs"`` entry, if any, is passed to
``build_backbone`` to rebuild the same architecture. A plain state dict (e.g. arcface_torch's
``model.pt``) also loads when the backbone name is given.

CLI: ``python -m gbcosface.export --checkpoint model.pt --output model.onnx`` writes an ONNX
graph with input ``images`` ``[batch, 3, 112, 112]`` and output ``embeddings`` ``[batch, D]``,
the batch axis dynamic, and checks it with onnxruntime when that is installed.
``--exporter`` picks torch's dynamo exporter (needs onnxscript) or the TorchScript one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gbcosface.backbones import build_backbone, unwrap
from gbcosface.eval.cli import run

FORMAT_KEYS = ("backbone", "embedding_size", "state_dict")


def save_backbone(path: str | Path, name: str, model: nn.Module, **meta) -> None:
    """Write ``model`` (unwrapped, on CPU) with its name and ``meta`` as the ``config`` dict.

    Pass ``backbone_kwargs={...}`` in ``meta`` when the backbone was built with options.
    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    model = unwrap(model)
    embedding_size = meta.pop("embedding_size", getattr(model, "embedding_size", None))
    if embedding_size is None:
        raise ValueError(f"save_backbone: {type(model).__name__} has no embedding_size; pass embedding_size=")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"backbone": name, "embedding_size": int(embedding_size), "state_dict": state,
                "config": dict(meta)}, tmp)
    tmp.replace(path)


def load_backbone(path: str | Path, name: str | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the backbone of a :func:`save_backbone` file in eval mode.

    A plain state dict needs ``name`` (and is assumed 512-d unless its ``features`` layer says
    otherwise); keys with a ``module.`` prefix (saved from DDP) are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not our format"
        raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if "state_dict" in ckpt or "backbone" in ckpt:
        missing = [k for k in FORMAT_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: backbone file lacks key(s) {', '.join(missing)}")
        name = name or ckpt["backbone"]
        embedding_size = int(ckpt["embedding_size"])
        kwargs = dict((ckpt.get("config") or {}).get("backbone_kwargs") or {})
        state = ckpt["state_dict"]
    else:
        if name is None:
            raise ValueError(f"{path}: a plain state dict without a backbone name; pass the name "
                             "(--backbone iresnet100, r50, ...)")
        state = ckpt
        feat = state.get("features.weight", state.get("module.features.weight"))
        embedding_size = int(feat.shape[0]) if feat is not None else 512
        kwargs = {}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_backbone(name, embedding_size, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit backbone {name!r} ({embedding_size}-d): {exc}") from None
    return model.eval()


def _dynamo_available() -> bool:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, output: str | Path, input_size: int = 112, opset: int = 18,
                exporter: str = "auto") -> Path:
    """Export a float32, eval-mode copy of ``model`` to one ONNX file with a dynamic batch axis.

    ``exporter``: ``"dynamo"`` (torch.export based, the default since torch 2.9; needs
    onnxscript), ``"torchscript"`` (the older exporter, deprecated but dependency-free and
    still working for these conv nets), or ``"auto"``: dynamo when onnxscript is installed.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"unknown ONNX exporter {exporter!r}; use auto, dynamo or torchscript")
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and _dynamo_available())
    model = copy.deepcopy(unwrap(model)).float().eval().cpu()  # leave the caller's model as it was
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, 3, input_size, input_size)
    names = {"input_names": ["images"], "output_names": ["embeddings"], "opset_version": opset}
    with torch.no_grad():
        if use_dynamo:
            batch = torch.export.Dim("batch", min=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree notices
                torch.onnx.export(model, (dummy,), str(output), dynamic_shapes=({0: batch},), dynamo=True,
                                  external_data=False, verbose=False, **names)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (dummy,), str(output), dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, **names)
    return output


def check_onnx(model: nn.Module, onnx_path: str | Path, batch: int = 3, input_size: int = 112,
               seed: int = 0) -> float:
    """Max absolute difference between onnxruntime and torch on a random batch."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = copy.deepcopy(unwrap(model)).float().eval().cpu()(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(["embeddings"], {"images": x.numpy()})[0]
    return float(abs(out - ref).max())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbcosface.export", description="Export a backbone to ONNX")
    p.add_argument("--checkpoint", required=True, help="backbone file (model.pt)")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument("--backbone", help="backbone name, only for a plain state-dict checkpoint")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: dynamo when onnxscript is installed, else torchscript")
    args = p.parse_args(argv)
    model = load_backbone(args.checkpoint, name=args.backbone)
    out = export_onnx(model, args.output, args.input_size, args.opset, args.exporter)
    print(f"wrote {out}")
    try:
        diff = check_onnx(model, out, input_size=args.input_size)
    except ImportError:
        print("onnxruntime not installed: output not checked")
    else:
        print(f"onnxruntime vs torch: max abs difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
