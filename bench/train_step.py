"""One training step at real size: step time, peak memory and achieved TFLOP/s.

    python bench/train_step.py                                   # IDAdapter, SD2.1-size, 512x512, batch 4, bf16, CUDA
    python bench/train_step.py --gradient_checkpointing false
    python bench/train_step.py --method adaface                  # AdaFace's face distillation, SD1.5/Arc2Face size
    python bench/train_step.py --method wplus --batch 16 --mixed_precision fp16   # W+ stage II, SD1.5 size
    ./dev python bench/train_step.py --device cpu --resolution 256 --batch 1 --rounds 1  # a CPU smoke run
    python bench/train_step.py --id_decode window                # IDAdapter: decode only the face's latent window
    python bench/train_step.py --compile unet vae_decoder arcface   # IDAdapter: torch.compile these (the warm-up
                                                                    # round, excluded as always, compiles)
    python bench/train_step.py --channels_last                   # IDAdapter: channels-last UNet, VAE and ArcFace
    python bench/train_step.py --sync_debug --mixed_precision bf16 --compile unet   # also list where a step makes
                                                                 # the host wait for the GPU (CUDA's sync debug mode)

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
step with it off (--cache_mb 0: its photos decoded by the prefetch threads while the step before runs, or with
--prefetch_threads 0 in the step) is interleaved with the cached one for the ratios. The synthetic photos are
--photo_size pixels square (1024 by default, FFHQ's size; PNG).

Steps are timed over --rounds rounds after a warm-up round (CUDA events on a GPU); prints the median step time
(min-max), peak memory of a cached step, TFLOP per step and TFLOP/s from the median; writes
bench/results/train_step-<method>-<resolution>px-b<batch>-<mixed precision>-<device>.json.
"""

import argparse
import collections
import itertools
import os
import tempfile
import traceback
import warnings

import torch

# bench/common.py (the script's own folder) first: importing it imports the pack as `comfyui_idadapter`
from common import SD15_UNET, comparison, comparison_lines, device_name, interleaved, write_results
from comfyui_idadapter.nodes.arch.iresnet import IRESNET_LAYERS, IResNet
from comfyui_idadapter.training import tiny
from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig
from comfyui_idadapter.training.adaface_expansion import expand_to_multipliers
from comfyui_idadapter.training.adaface_models import DEFAULT_LAYER_WEIGHTS, AdaFaceModels
from comfyui_idadapter.training.adaface_task import AdaFaceTask
from comfyui_idadapter.training.base_model import PerImageCache
from comfyui_idadapter.training.idadapter_config import COMPILE_TARGETS, IDAdapterTrainConfig
from comfyui_idadapter.training.id_decode import DECODES
from comfyui_idadapter.training.idadapter_models import Components
from comfyui_idadapter.training.idadapter_task import IDAdapterTask, PhotoPrefetcher


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
        expand_to_multipliers(inverter, args.multipliers)
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
    from comfyui_idadapter.training.wplus_config import WPlusTrainConfig
    from comfyui_idadapter.training.wplus_models import WPlusModels
    from comfyui_idadapter.training.wplus_task import WPlusTask

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


def sync_sites(step) -> collections.Counter:
    """Runs ``step`` with CUDA's sync debug mode on: every operation that makes the host wait for the GPU (a read
    back, a blocking copy, a data-dependent shape) is counted by where it was called (the innermost frames outside
    torch); other warnings are shown as usual."""
    sites = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if os.sep + "torch" + os.sep not in f.filename
                  and not f.filename.endswith("warnings.py")]
        sites[" <- ".join(f"{os.path.relpath(f.filename)}:{f.lineno}" for f in reversed(frames[-3:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", default="true", choices=["true", "false"])
    parser.add_argument("--profile", action="store_true", help="also print where one step's time goes")
    parser.add_argument("--method", default="idadapter", choices=["idadapter", "adaface", "wplus"])
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2], help="W+: the stage whose step is timed")
    parser.add_argument("--id_decode", default="full", choices=list(DECODES),
                        help="IDAdapter: what the identity loss decodes of x0_hat (the trainer's --id_decode)")
    parser.add_argument("--compile", nargs="+", default=["none"], choices=["none", *COMPILE_TARGETS],
                        help="IDAdapter: the trainer's --compile (the parts torch.compile compiles)")
    parser.add_argument("--compile_backend", default="inductor", help="the trainer's --compile_backend")
    parser.add_argument("--channels_last", action="store_true", help="IDAdapter: the trainer's --channels_last true")
    parser.add_argument("--photo_size", type=int, default=1024, help="the synthetic dataset's photo size (pixels)")
    parser.add_argument("--sync_debug", action="store_true",
                        help="CUDA: also run one step in CUDA's sync debug mode and list where the host waited")
    parser.add_argument("--multipliers", type=int, nargs=12, default=[8, 8, 8] + [4] * 9,
                        help="AdaFace: the inverter's K/V multipliers")
    args = parser.parse_args()
    if args.sync_debug and args.device != "cuda":
        parser.error("--sync_debug needs --device cuda: it lists where the host waits for the GPU")
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    tmp = tempfile.mkdtemp()
    pack = tiny.make_pack(os.path.join(tmp, "insightface"))
    # 4 identities of N + 1 photos: IDAdapter's --min_images (N + 1 by default) leaves a target beside N references
    dataset = tiny.make_synthetic_dataset(os.path.join(tmp, "data"), 4, IDAdapterTrainConfig.num_images + 1,
                                          size=args.photo_size)
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
                                      id_decode=args.id_decode, compile=args.compile,
                                      compile_backend=args.compile_backend, channels_last=args.channels_last)
        task = IDAdapterTask(config, components, log=lambda *a: None)
        title = (f"IDAdapter training step, SD2.1 size, --id_decode {args.id_decode}, --compile {' '.join(args.compile)}"
                 + (", channels-last" if args.channels_last else ""))
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
    batches = itertools.count()  # each step its own batch, as in a run
    if args.method == "idadapter":
        task.fill_cache([image for identity in task.identities for image in identity.images])  # as after an epoch
        # --cache_mb 0: the photos are decoded (by the prefetch threads, or in the step) and the frozen VAE encoder
        # and CLIP vision run every step
        settings = {"cached": (task.cache, task.prefetcher),
                    "--cache_mb 0": (PerImageCache(0), PhotoPrefetcher(config.prefetch_threads)),
                    "--cache_mb 0 --prefetch_threads 0": (PerImageCache(0), PhotoPrefetcher(0))}
        # each setting its own run of steps, so that its prefetcher's loads are for its own next step
        own_steps = {name: itertools.count(1_000_000 * k) for k, name in enumerate(settings)}

        def with_setting(name):
            def call():
                task.cache, task.prefetcher = settings[name]
                step(next(own_steps[name]))
            return call

        variants = {name: with_setting(name) for name in settings}
    else:
        if args.method == "wplus":
            task.fill_cache()
        variants = {"step": lambda: step(next(batches))}
    default = next(iter(variants))
    timings = comparison(interleaved(variants, args.rounds, accelerator.device), default)
    seconds = timings["variants"][default]["median"]
    if args.method == "idadapter":
        task.cache, task.prefetcher = settings["cached"]
    peak = None
    if cuda:  # one more step of the default setting, alone, for its peak
        torch.cuda.reset_peak_memory_stats()
        step(next(batches))
        peak = torch.cuda.max_memory_allocated() / 2**30
    # counted eagerly: compiled code runs past the counter's per-module hooks (a compiled step's work is the same)
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step(next(batches))
    flops = counter.get_total_flops()
    per_module = sorted(((sum(ops.values()), name) for name, ops in counter.get_flop_counts().items()
                         if name != "Global" and "." not in name), reverse=True)
    print(f"{title}, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{accelerator.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}, "
          f"{device_name(accelerator.device)}, {torch.get_num_threads()} threads; {args.rounds} rounds")
    print(f"  trainable parameters {trainable / 1e6:.1f} M")
    print("\n".join(comparison_lines(timings)))
    print(f"  step time   {seconds:.3f} s   ({1 / seconds:.2f} steps/s; {config.max_steps // 1000}k steps = "
          f"{config.max_steps * seconds / 3600:.1f} h)")
    print(f"  peak memory {'-' if peak is None else f'{peak:.1f} GiB'}")
    if args.method == "idadapter":
        print(f"  the per-photo cache makes a step {timings['variants']['--cache_mb 0']['ratio']:.2f}x faster; "
              "without it, decoding the photos in the step instead of in the prefetch threads makes a step "
              f"{timings['variants']['--cache_mb 0 --prefetch_threads 0']['median'] / timings['variants']['--cache_mb 0']['median']:.2f}x slower")
    print(f"  {flops / 1e12:.1f} TFLOP per step -> {flops / seconds / 1e12:.3g} TFLOP/s achieved")
    for count, name in per_module:  # forward and backward of each top-level module the step calls
        print(f"    {name:<40} {count / 1e12:7.2f} TFLOP  ({count / flops:5.1%})")
    results = {"method": args.method, "title": title, "resolution": args.resolution, "batch": args.batch,
               "mixed_precision": accelerator.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
               "rounds": args.rounds, "trainable_m": trainable / 1e6, "s_per_step": seconds, "peak_gib": peak,
               "tflop_per_step": flops / 1e12, "tflops": flops / seconds / 1e12,
               "tflop_by_module": {name: count / 1e12 for count, name in per_module}, "step": timings}
    if args.method == "idadapter":
        results["cache_speedup"] = timings["variants"]["--cache_mb 0"]["ratio"]
        results["prefetch_speedup"] = (timings["variants"]["--cache_mb 0 --prefetch_threads 0"]["median"]
                                       / timings["variants"]["--cache_mb 0"]["median"])
    method = f"wplus-stage{args.stage}" if args.method == "wplus" else args.method
    if args.method == "idadapter":  # a setting other than the defaults gets its own file
        compiled = config.compiled_parts()
        method += (f"-{args.id_decode}" if args.id_decode != "full" else "") + (
            f"-compile-{'-'.join(compiled)}-{args.compile_backend}" if compiled else "") + (
            "-channels-last" if args.channels_last else "")
    path = write_results(f"train_step-{method}-{args.resolution}px-b{args.batch}-{accelerator.mixed_precision}",
                         accelerator.device, results)
    print(f"wrote {path}")
    if args.sync_debug:
        sites = sync_sites(lambda: step(next(batches)))
        print(f"  the host waited for the GPU {sum(sites.values())} times in one step" + (":" if sites else ""))
        for site, count in sites.most_common():
            print(f"    {count:4d}x  {site}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            with record_function("train_step"):
                step(next(batches))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
