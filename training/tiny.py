"""Tiny random stand-ins for every model the trainers use, and a synthetic identity set: what ``--preset tiny``
and the tests run on. Shapes follow SD1.5 where the file formats check them (text width 768, ArcFace 512).

The face models are real ONNX files in an insightface pack layout, so insightface's own detection, alignment
and embedding code runs on them. The detector is SCRFD-shaped (9 outputs: scores, box distances and
keypoints at strides 8, 16, 32, two anchors each) and "detects" a face in every 32x32 cell of its 128x128 input
whose mean brightness is high: the box is that cell and the landmarks are the ArcFace template scaled into it.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nodes.arch.iresnet import ARCFACE_TEMPLATE_112, IResNet
from .diffusion import training_target

DET_INPUT = 128
CELL = 32  # the detecting stride: a face is one 32x32 cell of the detector input
IDENTIFIER_WORDS = ["sks", "z", "person", "woman", "man", "is", "a", "photo", "of", "painting", "smiling", "outdoors",
                    "in", "the", "snow", "portrait", "close", "up", ","]


class TinySCRFD(nn.Module):
    def forward(self, x):
        scores, boxes, kps = [], [], []
        template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float32).reshape(1, 10) / 112.0
        for stride in (8, 16, 32):
            brightness = F.avg_pool2d(x.mean(1, keepdim=True), stride).flatten().repeat_interleave(2)
            n = brightness.shape[0]
            score = torch.sigmoid(20.0 * brightness) if stride == CELL else brightness * 0.0
            scores.append(score.reshape(n, 1))
            # distances in stride units from the anchor (the cell's top-left corner): the box is the cell
            boxes.append(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4) + brightness.reshape(n, 1) * 0.0)
            kps.append(template.expand(n, 10) + brightness.reshape(n, 1) * 0.0)
        return (*scores, *boxes, *kps)


def export_onnx(module: nn.Module, path: str, example: torch.Tensor, dynamic_batch: bool = False) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), example, path,
            dynamo=False,  # the TorchScript exporter, like insightface's own torch2onnx (opset 11, BN folded)
            opset_version=11, input_names=["data"],
            dynamic_axes={"data": {0: "batch"}} if dynamic_batch else None,
        )
    return path


def random_iresnet(seed: int = 0, layers=(1, 1, 1, 1), widths=(8, 16, 16, 32)) -> IResNet:
    """A small IResNet with non-trivial BatchNorm statistics and PReLU slopes (so BN folding matters)."""
    gen = torch.Generator().manual_seed(seed)
    net = IResNet(layers, widths, 512)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        net.features.weight.fill_(1.0)
    return net.eval()


def make_detector(path: str) -> str:
    return export_onnx(TinySCRFD(), path, torch.zeros(1, 3, DET_INPUT, DET_INPUT))


def make_recognizer(path: str, seed: int = 0) -> str:
    return export_onnx(random_iresnet(seed), path, torch.zeros(1, 3, 112, 112), dynamic_batch=True)


def make_pack(insightface_root: str, name: str = "tinypack", detector=True, recognizer=True) -> str:
    """``<insightface_root>/models/<name>/`` with det.onnx and rec.onnx, laid out like antelopev2."""
    folder = os.path.join(insightface_root, "models", name)
    os.makedirs(folder, exist_ok=True)
    if detector:
        make_detector(os.path.join(folder, "det.onnx"))
    if recognizer:
        make_recognizer(os.path.join(folder, "rec.onnx"))
    return folder


# ---------------------------------------------------------------------------------------------------------
# synthetic identities


def identity_look(identity: int) -> tuple[np.ndarray, np.ndarray]:
    """An identity's look: a saturated hue (evenly spaced around the colour wheel) and a fixed two-level 8x8
    pattern. Faces are the hue lightened (bright enough to be detected), the background the hue darkened."""
    import colorsys

    rng = np.random.default_rng(1000 + identity)
    hue = (identity * 0.618034) % 1.0  # golden-ratio steps keep neighbouring identities apart
    colour = np.array(colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    texture = np.where(rng.random((8, 8, 1)) > 0.5, 1.0, 0.75)
    return colour, texture


def synthetic_image(identity: int, cell: tuple[int, int], size: int, seed: int) -> np.ndarray:
    """[size, size, 3] float 0..1: a dim background in the identity's tint (too dark to be detected), and the
    identity's face in one cell of a 4x4 grid."""
    rng = np.random.default_rng(seed)
    colour, texture = identity_look(identity)
    img = colour * 0.35 + 0.03 * rng.random((size, size, 1))
    side = size // 4
    tile = np.kron(texture, np.ones((side // 8, side // 8, 1))) if side >= 8 else texture[:side, :side]
    r, c = cell
    img[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.clip(tile * (0.5 + 0.5 * colour), 0, 1)
    return img


def cell_landmarks(cell: tuple[int, int], size: int = DET_INPUT) -> np.ndarray:
    """[5, 2] landmarks of a face in ``cell`` (row, col) of the 4x4 grid of a size x size image: the ArcFace template
    scaled into the cell, as the tiny detector reports them and where synthetic_image's face lies."""
    r, c = cell
    s = size * CELL / DET_INPUT
    return np.array(ARCFACE_TEMPLATE_112, dtype=np.float32) * (s / 112.0) + np.array([c * s, r * s], np.float32)


def synthetic_faces(cells: list[tuple[int, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Photos of identities 0, 1, ... with their face in the given cells: [B, 3, size, size] in -1..1 (a VAE's input
    range) and their landmarks [B, 5, 2]."""
    images = [torch.from_numpy(synthetic_image(i, cell, size, seed=i)).float().permute(2, 0, 1)
              for i, cell in enumerate(cells)]
    return torch.stack(images) * 2 - 1, torch.stack([torch.from_numpy(cell_landmarks(cell, size)) for cell in cells])


CAPTIONS = ["a photo of a person", "a person outdoors", "a portrait of a person", "a close up photo of a person"]


def make_synthetic_dataset(root: str, identities: int, images: int, size: int = 64, seed: int = 0,
                           first_identity: int = 0) -> str:
    """Writes the documented dataset layout: ``<root>/<identity>/*.png`` + metadata.jsonl + class_noun.txt, for the
    identities numbered from ``first_identity`` (other numbers: other people)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for identity in range(first_identity, first_identity + identities):
        folder = os.path.join(root, f"id{identity:03d}")
        os.makedirs(folder, exist_ok=True)
        lines = []
        for i in range(images):
            cell = (int(rng.integers(4)), int(rng.integers(4)))
            pixels = synthetic_image(identity, cell, size, seed=int(rng.integers(2**31)))
            name = f"img{i:02d}.png"
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(os.path.join(folder, name))
            lines.append(json.dumps({"file_name": name, "caption": CAPTIONS[int(rng.integers(len(CAPTIONS)))]}))
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(folder, "class_noun.txt"), "w") as f:
            f.write("person\n")
    return root


# ---------------------------------------------------------------------------------------------------------
# tiny diffusion models (diffusers / transformers classes, random weights)


def tiny_tokenizer(folder: str):
    """A real CLIPTokenizer over a tiny BPE vocabulary in which every word of IDENTIFIER_WORDS and CAPTIONS is
    one token (like "sks" in CLIP's own vocabulary)."""
    from transformers import CLIPTokenizer

    words = sorted(set(IDENTIFIER_WORDS + " ".join(CAPTIONS).split()))
    vocab, merges = {}, []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for ch in "abcdefghijklmnopqrstuvwxyz,.!?'":
        add(ch)
        add(ch + "</w>")
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            add(merged)
            pieces = [merged] + pieces[2:]
    add("<|startoftext|>")
    add("<|endoftext|>")
    os.makedirs(folder, exist_ok=True)
    # written to a temporary file and renamed: several processes of one run may build the tokenizer at once
    for name, text in (("vocab.json", json.dumps(vocab)), ("merges.txt", "#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")):
        tmp = os.path.join(folder, f"{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(folder, name))
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def _tiny_text_config(vocab_size: int, hidden_size: int, layers: int, **extra):
    """A narrow CLIP text config at a real width, over the tiny tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **extra)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config(vocab_size, 768, 1))


def tiny_sdxl_text_encoders(vocab_size: int, seed: int = 0):
    """SDXL's pair at the real widths (CLIP-L 768; OpenCLIP bigG 1280 with its pooled projection), two layers
    each so the penultimate hidden state SDXL conditions on is a real layer's output."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return (CLIPTextModel(_tiny_text_config(vocab_size, 768, 2)),
            CLIPTextModelWithProjection(_tiny_text_config(vocab_size, 1280, 2, projection_dim=1280)))


def tiny_sdxl_unet(seed: int = 0):
    """SDXL's shape in miniature: a first level without attention, 2 transformer blocks per attention, context
    2048 and the text_time added conditioning (pooled 1280 + 6 time ids)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=2048, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=1280 + 6 * 8,
    )


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=4, norm_num_groups=8,
    )


def tiny_scheduler(prediction_type: str = "v_prediction"):
    """The noise schedule of the tiny preset, configured as SD2.1's scheduler file is (v-prediction, steps_offset 1,
    no sample clipping): the pipelines then have nothing to warn about."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1, clip_sample=False)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # scaling_factor as SD chooses its own: this random encoder's latents have std ~0.25, so x4 gives unit variance
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=4.0)
    with torch.no_grad():  # a trained VAE's posterior is narrow; a random one's is not: pin its log-variance low
        logvar = vae.quant_conv.weight.shape[0] // 2
        vae.quant_conv.weight[logvar:].zero_()
        vae.quant_conv.bias[logvar:].fill_(-20.0)
    return vae


def sd_size_vae(seed: int = 0):
    """A VAE of SD1.5/2.x's shape with random weights: for benches and tests that need a full-size decoder's work."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def tiny_clip_vision(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=32, patch_size=8,
                                                          projection_dim=32))


def tiny_clip_model(folder: str, tokenizer, seed: int = 0) -> str:
    """A stand-in for a CLIP text-image model (CLIP-T's): a transformers CLIPModel over the tiny tokenizer, random
    weights, saved with that tokenizer as a model folder is (built once)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(seed)
        text = _tiny_text_config(len(tokenizer), 32, 1)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
                  ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def pretrain_base(unet, vae, text_encoder, tokenizer, noise_scheduler, dataset_dir: str, steps: int, seed: int = 0):
    """Makes the random tiny UNet a (poor but real) denoiser of the synthetic images, as a stand-in for a
    pretrained Stable Diffusion: adapters are trained on top of a base model that already denoises.
    Plain text-conditional diffusion training of the whole UNet on the dataset's images and captions."""
    from PIL import Image

    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(dataset_dir) for f in files if f.endswith(".png"))
    captions = {}
    for root, _, files in os.walk(dataset_dir):
        if "metadata.jsonl" in files:
            with open(os.path.join(root, "metadata.jsonl")) as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        captions[os.path.join(root, entry["file_name"])] = entry["caption"]
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in paths])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer([captions.get(p, "") for p in paths], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        pick = torch.randint(len(paths), (4,), generator=gen)
        noise = torch.randn(latents[pick].shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (4,), generator=gen)
        noisy = noise_scheduler.add_noise(latents[pick], noise, t)
        target = training_target(noise_scheduler, latents[pick], noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=text[pick]).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()
    return unet


def base_unet(assets: str, vae, text_encoder, tokenizer, noise_scheduler, data_dir: str, steps: int, seed: int = 0):
    """The tiny preset's base UNet: ``pretrain_base`` on the synthetic dataset once, saved under
    ``<assets>/base_unet`` and read back by later runs into the same output folder."""
    from diffusers import UNet2DConditionModel

    folder = os.path.join(assets, "base_unet")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return UNet2DConditionModel.from_pretrained(folder)
    unet = pretrain_base(tiny_unet(), vae, text_encoder, tokenizer, noise_scheduler, data_dir, steps, seed)
    unet.save_pretrained(folder)
    return unet


class TinyWPlusEncoder(nn.Module):
    """A stand-in for e4e (``e4e.WPlusEncoder``: aligned faces [B, 3, H, W] in 0..1 -> W+ [B, 18, 512]) in the tiny
    preset: the face pooled to 8x8 and sent through a fixed random map around a random ``latent_avg``, at the
    spread of real e4e codes (std about 0.5). Different faces give different codes, as e4e's do; the real encoder
    (267 M parameters, about a second per face on a CPU) would make every tiny run wait for it."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from ..nodes.arch.wplus import W_DIM, W_ROWS

        gen = torch.Generator().manual_seed(seed)
        self.shape = (W_ROWS, W_DIM)
        self.register_buffer("projection", torch.randn(3 * 8 * 8, W_ROWS * W_DIM, generator=gen) * 0.25)
        self.register_buffer("latent_avg", torch.randn(W_ROWS, W_DIM, generator=gen) * 0.3)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images01.float(), 8).flatten(1) - 0.5
        return (pooled @ self.projection).view(-1, *self.shape) + self.latent_avg


def face_assets(config, size: int, heldout_identities: int, heldout_images: int,
                heldout_first_identity: int = 0) -> tuple[str, str, str, str]:
    """The tiny preset's face data under ``<output_dir>/tiny_assets`` (built once, then reused): the folder itself, an
    insightface pack, a synthetic dataset and a held-out set (``--dataset``/``--heldout_dataset`` win when given).
    Held-out identities numbered from ``heldout_first_identity``: 0 gives new photos of the training identities."""
    assets = os.path.join(config.output_dir, "tiny_assets")
    pack = os.path.join(assets, "insightface", "models", "tinypack")
    if not os.path.isfile(os.path.join(pack, "rec.onnx")):
        make_pack(os.path.join(assets, "insightface"), "tinypack")
    data_dir = config.dataset or os.path.join(assets, "dataset")
    if not config.dataset and not os.path.isdir(data_dir):
        make_synthetic_dataset(data_dir, config.synthetic_identities, config.synthetic_images, size=size,
                               seed=config.seed)
    heldout_dir = config.heldout_dataset or os.path.join(assets, "heldout")
    if not config.heldout_dataset and not os.path.isdir(heldout_dir):
        make_synthetic_dataset(heldout_dir, heldout_identities, heldout_images, size=size, seed=config.seed + 99,
                               first_identity=heldout_first_identity)
    return assets, pack, data_dir, heldout_dir


def tiny_clip_l(layers: int, seed: int = 0):
    """A stand-in for CLIP ViT-L/14's text encoder (AdaFace's inverter and Arc2Face's ID encoder): its width and
    vocabulary (the inverter's templates use CLIP's token ids), ``layers`` narrow layers, random weights."""
    from ..nodes.arch import adaface

    model = adaface.CLIPTextTransformer(adaface.TextModelConfig(intermediate_size=64, num_layers=layers))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            around = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(around + torch.randn(p.shape, generator=gen) * 0.02)
    return model


def fine_tuned(unet, scale: float = 0.05, seed: int = 3):
    """A copy of ``unet`` with every weight moved by ``scale`` of its own std: a stand-in for a fine-tune of it, as
    Arc2Face's UNet is of SD1.5's."""
    import copy

    tuned = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return tuned
