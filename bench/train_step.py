"""One training step at real size: step time, peak memory and achieved TFLOP/s.

    python bench/train_step.py                                   # IDAdapter, SD2.1-size, 512x512, batch 4, bf16, CUDA
    python bench/train_step.py --gradient_checkpointing false
    python bench/train_step.py --method adaface                  # AdaFace's face distillation, SD1.5/Arc2Face size
    python bench/train_step.py --method wplus --batch 16 --mixed_precision fp16   # W+ stage II, SD1.5 size
    ./dev python bench/train_step.py --device cpu --resolution 256 --batch 1 --steps 1   # a CPU smoke run
    python bench/train_step.py --id_decode window                # IDAdapter: decode only the face's latent window

AdaFace (--method adaface): random weights at SD1.5's sizes (UNet, CLIP-L text encoder) for the student and
Arc2Face's (an SD1.5-size UNet, a CLIP-L ID encoder) for the teacher, the inverter a CLIP-L with K/V multipliers
--multipliers (the paper's final (8, 8, 8, 4, ..., 4) by default), the trainer's own step
(training/adaface_task.py: 3 distillation steps, batch 4 as in the paper).

W+ adapter (--method wplus, --stage 2 by default): random weights at SD1.5's sizes (UNet, VAE, CLIP-L text encoder),
the adapter on all 16 cross-attention layers (7.1 M mapping + 31.6 M residual attention), the trainer's own step
(training/wplus_task.py; stage II: the trained pass plus two target passes without gradients, the shuffled code's and
the branch-off one). The W+ codes are cached before training, so e4e is not part of a step (a stand-in makes them).

IDAdapter (the default): random weights at the published sizes (SD2.1 UNet/VAE/OpenCLIP-H text encoder, CLIP ViT-H/14 vision, ArcFace
IResNet-100), the trainer's own step (training/idadapter_task.py: MFF + text token + gated adapters +
K/V, L_SD + 0.1 * gated ID loss through the VAE decoder) on a synthetic identity set; the tiny insightface
stand-in does the up-front face detection. FLOPs are counted with torch's FlopCounterMode over one step, in
all and per top-level module. The per-photo cache is filled first, as after a real run's first epoch, and the
step is timed again with it off (--cache_mb 0) for the ratio.
"""

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile
import time

import torch

# Run as a script: import this checkout as the package `comfyui_idadapter` (ComfyUI owns the top-level name `nodes`).
_root = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comfyui_idadapter", _root / "__init__.py", submodule_search_locations=[str(_root)])
sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pack)

from common import SD15_UNET  # noqa: E402

from comfyui_idadapter.nodes.arch.iresnet import IRESNET_LAYERS, IResNet  # noqa: E402
from comfyui_idadapter.training import tiny  # noqa: E402
from comfyui_idadapter.nodes.arch import adaface as ada  # noqa: E402
from comfyui_idadapter.training.adaface_task import DEFAULT_LAYER_WEIGHTS, AdaFaceModels, AdaFaceTask  # noqa: E402
from comfyui_idadapter.training.config import AdaFaceTrainConfig, IDAdapterTrainConfig  # noqa: E402
from comfyui_idadapter.training.id_decode import DECODES  # noqa: E402
from comfyui_idadapter.training.idadapter_task import Components, IDAdapterTask, PerImageCache  # noqa: E402


def sd21_components(device, tokenizer, pack):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from comfyui_idadapter.nodes.face import insightface_backend

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        )
        vae = tiny.sd_size_vae()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                            hidden_act="gelu", bos_token_id=len(tokenizer) - 2,
                                            eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                                num_hidden_layers=32, num_attention_heads=16,
                                                                image_size=224, patch_size=14, projection_dim=1024,
                                                                hidden_act="gelu"))
        arcface = IResNet(IRESNET_LAYERS["r100"])
    scheduler = tiny.tiny_scheduler()
    analyzer = insightface_backend.load_analyzer(pack, "CPU")
    return Components(tokenizer, text, vae, unet, scheduler, vision, arcface.eval(), analyzer)


def adaface_task(device, tokenizer, pack, dataset, args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_idadapter.nodes.face import insightface_backend

    def sd15_unet():
        return UNet2DConditionModel(**SD15_UNET)

    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", bos_token_id=len(tokenizer) - 2,
                                            eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
        inverter = ada.CLIPTextTransformer(ada.TextModelConfig())
        ada.expand_to_multipliers(inverter, args.multipliers)
        models = AdaFaceModels(
            tokenizer=tokenizer, text_encoder=text, unet=sd15_unet(), noise_scheduler=tiny.tiny_scheduler("epsilon"),
            vae=tiny.tiny_vae(), teacher_unet=sd15_unet(), arc2face=ada.CLIPTextTransformer(ada.TextModelConfig()),
            inverter=inverter, hidden_state_layer_weights=torch.tensor(DEFAULT_LAYER_WEIGHTS),
            analyzer=insightface_backend.load_analyzer(pack, "CPU"))
    config = AdaFaceTrainConfig(dataset=dataset, output_dir=os.path.dirname(dataset), resolution=args.resolution,
                                batch_size=args.batch, gradient_checkpointing=args.gradient_checkpointing == "true",
                                mixed_precision=args.mixed_precision, report_to="none", optimizer="adamw")
    return AdaFaceTask(config, models, log=lambda *a: None), "AdaFace face distillation, SD1.5/Arc2Face size"


def wplus_task(device, tokenizer, pack, dataset, args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_idadapter.nodes.face import insightface_backend
    from comfyui_idadapter.training.config import WPlusTrainConfig
    from comfyui_idadapter.training.wplus_task import WPlusModels, WPlusTask

    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", bos_token_id=len(tokenizer) - 2,
                                            eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
        vae = tiny.sd_size_vae()
        models = WPlusModels(tokenizer, text, vae, UNet2DConditionModel(**SD15_UNET), tiny.tiny_scheduler("epsilon"),
                             tiny.TinyWPlusEncoder, "bench", insightface_backend.load_analyzer(pack, "CPU"))
    config = WPlusTrainConfig(dataset=dataset, output_dir=os.path.dirname(dataset), resolution=args.resolution,
                              batch_size=args.batch, stage=args.stage, report_to="none",
                              gradient_checkpointing=args.gradient_checkpointing == "true",
                              mixed_precision=args.mixed_precision)
    return WPlusTask(config, models, log=lambda *a: None), f"W+ adapter stage {args.stage}, SD1.5 size"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", default="true", choices=["true", "false"])
    parser.add_argument("--profile", action="store_true", help="also print where one step's time goes")
    parser.add_argument("--method", default="idadapter", choices=["idadapter", "adaface", "wplus"])
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2], help="W+: the stage whose step is timed")
    parser.add_argument("--id_decode", default="full", choices=list(DECODES),
                        help="IDAdapter: what the identity loss decodes of x0_hat (the trainer's --id_decode)")
    parser.add_argument("--multipliers", type=int, nargs=12, default=[8, 8, 8] + [4] * 9,
                        help="AdaFace: the inverter's K/V multipliers")
    args = parser.parse_args()
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    tmp = tempfile.mkdtemp()
    pack = tiny.make_pack(os.path.join(tmp, "insightface"))
    # N + 1 = 5 photos per identity: IDAdapter leaves out identities with fewer (--min_images)
    dataset = tiny.make_synthetic_dataset(os.path.join(tmp, "data"), 4, 5, size=args.resolution)
    tokenizer = tiny.tiny_tokenizer(os.path.join(tmp, "tokenizer"))
    accelerator = Accelerator(mixed_precision=args.mixed_precision if args.device == "cuda" else "no",
                              cpu=args.device == "cpu")
    if args.method in ("adaface", "wplus"):
        make = adaface_task if args.method == "adaface" else wplus_task
        task, title = make(accelerator.device, tokenizer, pack, dataset, args)
        config = task.config
    else:
        components = sd21_components(accelerator.device, tokenizer, pack)
        config = IDAdapterTrainConfig(dataset=dataset, output_dir=tmp, resolution=args.resolution,
                                      batch_size=args.batch, gradient_checkpointing=args.gradient_checkpointing == "true",
                                      mixed_precision=args.mixed_precision, report_to="none",
                                      id_decode=args.id_decode)
        task = IDAdapterTask(config, components, log=lambda *a: None)
        title = f"IDAdapter training step, SD2.1 size, --id_decode {args.id_decode}"
    task.setup(accelerator)
    optimizer = torch.optim.AdamW(task.param_groups(), lr=config.learning_rate, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(task.trainable, optimizer)
    trainable = sum(p.numel() for g in task.param_groups() for p in g["params"])

    def step(i):
        loss, _ = task.loss(model, i)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = accelerator.device.type == "cuda"

    def timed(first):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(first, first + args.steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    if args.method == "idadapter":
        task.fill_cache([image for identity in task.identities for image in identity.images])  # as after an epoch
    elif args.method == "wplus":
        task.fill_cache()
    step(0)  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if args.method == "idadapter":
        cache = task.cache
        task.cache = PerImageCache(0)  # --cache_mb 0: the frozen VAE encoder and CLIP vision run every step
        uncached = timed(1)
        task.cache = cache
    with FlopCounterMode(display=False) as counter:
        step(args.steps + 1)
    flops = counter.get_total_flops()
    per_module = sorted(((sum(ops.values()), name) for name, ops in counter.get_flop_counts().items()
                         if name != "Global" and "." not in name), reverse=True)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{title}, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{accelerator.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}, {name}")
    print(f"  trainable parameters {trainable / 1e6:.1f} M")
    print(f"  step time   {seconds:.3f} s   ({1 / seconds:.2f} steps/s; {config.max_steps // 1000}k steps = "
          f"{config.max_steps * seconds / 3600:.1f} h)")
    print(f"  peak memory {peak:.1f} GiB")
    if args.method == "idadapter":
        print(f"  without the per-photo cache {uncached:.3f} s/step: the cache makes a step {uncached / seconds:.2f}x "
              "faster")
    print(f"  {flops / 1e12:.1f} TFLOP per step -> {flops / seconds / 1e12:.3g} TFLOP/s achieved")
    for count, name in per_module:  # forward and backward of each top-level module the step calls
        print(f"    {name:<40} {count / 1e12:7.2f} TFLOP  ({count / flops:5.1%})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            with record_function("train_step"):
                step(args.steps + 2)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
