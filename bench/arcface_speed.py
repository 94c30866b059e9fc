"""ArcFace embedding speed: the pack's torch IResNet (imported from ONNX) vs onnxruntime on the same file.

Builds a random IResNet of a published size, exports it like insightface's torch2onnx (opset 11, BN folded),
imports it back with ``iresnet_from_onnx`` and times both on the same batch, in one run:

    ./dev python bench/arcface_speed.py --arch r50 --batch 8
    python bench/arcface_speed.py --arch r100 --device cuda   # on a GPU machine (onnxruntime stays on CPU
                                                               # unless onnxruntime-gpu is installed)

Prints milliseconds per batch and the torch/onnxruntime ratio, plus the torch backward cost (the trainers'
identity loss needs gradients, which onnxruntime cannot give).
"""

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile
import time
import warnings

import torch

# Run as a script: import this checkout as the package `comfyui_idadapter` (ComfyUI owns the top-level name `nodes`).
_root = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comfyui_idadapter", _root / "__init__.py", submodule_search_locations=[str(_root)])
sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pack)

from comfyui_idadapter.nodes.arch.iresnet import IRESNET_LAYERS, IResNet, iresnet_from_onnx  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(IRESNET_LAYERS), default="r50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import onnxruntime as ort

    net = IResNet(IRESNET_LAYERS[args.arch]).eval()
    x = torch.rand(args.batch, 3, 112, 112) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{args.arch}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, x[:1], path, dynamo=False, opset_version=11, input_names=["data"],
                              dynamic_axes={"data": {0: "batch"}})
        fused = iresnet_from_onnx(path).to(args.device)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        session = ort.InferenceSession(path, providers=providers)
        feed = {"data": x.numpy()}
        xd = x.to(args.device)

        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(
                fused(xd).cpu(), torch.from_numpy(session.run(None, feed)[0])
            ).min().item()
            torch_ms = timed(lambda: fused(xd), args.repeats)
        ort_ms = timed(lambda: session.run(None, feed), args.repeats)
        xg = xd.clone().requires_grad_(True)
        backward_ms = timed(lambda: fused(xg).square().sum().backward(), args.repeats)

    print(f"device: torch {args.device} ({torch.get_num_threads()} threads), onnxruntime {session.get_providers()[0]}")
    print(f"{args.arch}, batch {args.batch}: min cosine torch vs onnxruntime {cos:.6f}")
    print(f"  torch forward        {torch_ms:8.1f} ms")
    print(f"  onnxruntime forward  {ort_ms:8.1f} ms")
    print(f"  torch fwd+backward   {backward_ms:8.1f} ms")
    print(f"  ratio torch/onnxruntime forward: {torch_ms / ort_ms:.2f}x; backward/forward: {backward_ms / torch_ms:.2f}x")


if __name__ == "__main__":
    main()
