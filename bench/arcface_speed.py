"""ArcFace embedding speed: the pack's torch IResNet (imported from ONNX) vs onnxruntime on the same file.

Builds a random IResNet of a published size, exports it like insightface's torch2onnx (opset 11, BN folded),
imports it back with ``iresnet_from_onnx`` and times both on the same batch, in one run:

    ./dev python bench/arcface_speed.py --arch r50 --batch 8
    python bench/arcface_speed.py --arch r100 --device cuda   # on a GPU machine (onnxruntime stays on CPU
                                                               # unless onnxruntime-gpu is installed)

Interleaves the three over --rounds (onnxruntime given as many threads as torch) and prints the median milliseconds
per batch (min-max), the ratios of medians to onnxruntime's forward and the torch backward cost (the trainers'
identity loss needs gradients, which onnxruntime cannot give); writes
bench/results/arcface_speed-<arch>-b<batch>-<device>.json.
"""

import argparse
import os
import tempfile
import warnings

import torch

# bench/common.py (the script's own folder) first: importing it imports the pack as `comfyui_idadapter`
from common import comparison, comparison_lines, device_name, interleaved, write_results
from comfyui_idadapter.nodes.arch.iresnet import IRESNET_LAYERS, IResNet, iresnet_from_onnx


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(IRESNET_LAYERS), default="r50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch (its default: every core)
        session = ort.InferenceSession(path, options, providers=providers)
        feed = {"data": x.numpy()}
        xd = x.to(args.device)

        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(
                fused(xd).cpu(), torch.from_numpy(session.run(None, feed)[0])
            ).min().item()
        xg = xd.clone().requires_grad_(True)

        def waited(fn):
            """``fn`` and then the wait for the GPU: onnxruntime runs outside torch's CUDA stream, so CUDA events
            could not time it and all three are timed by the wall clock."""
            def call():
                fn()
                if xd.is_cuda:
                    torch.cuda.synchronize()
            return call

        def forward():
            with torch.no_grad():
                fused(xd)

        seconds = interleaved({"torch forward": waited(forward), "onnxruntime forward": lambda: session.run(None, feed),
                               "torch fwd+backward": waited(lambda: fused(xg).square().sum().backward())},
                              args.rounds, torch.device("cpu"))
    speed = comparison(seconds, "onnxruntime forward", "ms")
    medians = {name: v["median"] for name, v in speed["variants"].items()}
    backward_over_forward = medians["torch fwd+backward"] / medians["torch forward"]
    print(f"device: torch {args.device} ({device_name(torch.device(args.device))}, {torch.get_num_threads()} threads), "
          f"onnxruntime {session.get_providers()[0]}; {args.rounds} rounds")
    print(f"{args.arch}, batch {args.batch}: min cosine torch vs onnxruntime {cos:.6f}")
    print("\n".join(comparison_lines(speed)))
    print(f"  torch fwd+backward / torch forward: {backward_over_forward:.2f}x")
    path = write_results(f"arcface_speed-{args.arch}-b{args.batch}", torch.device(args.device), {
        "arch": args.arch, "batch": args.batch, "rounds": args.rounds, "onnxruntime": session.get_providers()[0],
        "min_cosine": cos, "speed": speed, "torch fwd+backward / torch forward": backward_over_forward})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
