"""The IDAdapter paper's metrics, runnable (``training/evaluate_idadapter.py``): images of one identity generated with
an IDAdapter file for a prompt set, then ID-Sim, the face-detection rate and Pose-Div yaw / pitch (the math is in
``nodes/arch/face_metrics.py``) and, with a CLIP model, CLIP-T; written to ``<output_dir>/metrics.json`` and
``metrics.md`` beside the images (``<output_dir>/images/``).

The references are used as IDAdapter MFF Embed uses them: the first N photos give both the ArcFace vectors (their
unit-length mean is f_a) and the CLIP-vision features, each photo cut as the adapter was trained
(``idadapter.reference_crop``: around its face, or the whole photo for older files), fewer than N copied up to N (the
paper duplicates a single photo; ``--augment`` for augmented copies). Each prompt gets ", <class noun> is <identifier>" appended, as in training and in
IDAdapter Text Encode, and is drawn once per seed with diffusers' pipeline (DDIM, classifier-free guidance, the
adapter on the conditional half, its K/V deltas added to the UNet at ``--weight``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nodes.arch import face_metrics
from ..nodes.arch import idadapter as ida
from ..nodes.errors import DatasetError
from ..nodes.face.insightface_backend import embed_faces, recognizer_fingerprint
from . import data as dataset
from . import diffusers_binding, tiny
from .base_model import base_family, sampling_pipeline
from .idadapter_config import IDAdapterEvalConfig, IDAdapterTrainConfig, read_prompts
from .idadapter_models import adapter_config, clip_vision_features, generate_image, load_components
from .prompts import PromptEncoder

# an identity prompt and one with an expression word, as the paper's ID and diversity prompts are
TINY_PROMPTS = ["a photo of sks", "a photo of sks, smiling"]
METRICS = ("id_sim", "id_sim_all_images", "face_detection_rate", "pose_div_pitch", "pose_div_yaw", "clip_t")
CLIP_BATCH = 16


def load_references(folder: str, analyzer) -> tuple[list[dataset.FaceImage], dict[str, list[str]]]:
    """The photos in ``folder`` with a detectable face (largest face each), and the files left out, by reason."""
    found, skipped = [], defaultdict(list)
    for name in sorted(os.listdir(folder)):
        if os.path.splitext(name)[1].lower() not in dataset.IMAGE_EXTENSIONS:
            continue
        path = os.path.join(folder, name)
        face = dataset.detect_face(path, analyzer)
        if "skip" in face:
            skipped[face["skip"]].append(name)
        else:
            found.append(dataset.FaceImage(path, "", face["box"], face["landmarks"], face["embedding"]))
    if not found:
        why = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in skipped.items())
        raise DatasetError(f"--references {folder!r} has no photo with a detectable face"
                           + (f" ({why})" if why else f" (no {'/'.join(sorted(dataset.IMAGE_EXTENSIONS))} file)"))
    return found, dict(skipped)


def identity_embeds(adapter: ida.IDAdapter, clip_vision, references: list[dataset.FaceImage], num_images: int,
                    augment: bool, seed: int, device, dtype) -> ida.IDAdapterEmbeds:
    """E_r and E_c of the references, as MFF Embed makes them (``num_images`` 0: the adapter's N)."""
    count = num_images or adapter.config.num_images
    used = references[:count]
    size, margin = clip_vision.config.image_size, adapter.config.face_crop_margin
    photos = torch.stack([ida.reference_crop(dataset.load_rgb_tensor(image.path), image.box, margin, size)
                          for image in used])
    filled = ida.fill_references(photos, count, seed, augment)
    patches, classes = clip_vision_features(clip_vision, filled, device, dtype)
    return ida.embed_references(adapter, patches, classes, torch.stack([image.embedding for image in used]))


def image_batch(images: list) -> torch.Tensor:
    """PIL images of one size -> IMAGE [B, H, W, 3] 0..1: the pixels as saved."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).float() / 255


def clip_t(folder: str, images: torch.Tensor, texts: list[str], device) -> list[float]:
    """CLIP-T: the cosine between each image [B, H, W, 3] and its text in a transformers CLIPModel's joint space."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pixels = ida.clip_vision_preprocess(images.movedim(-1, 1), model.config.vision_config.image_size)
    scores = []
    with torch.no_grad():
        for start in range(0, len(texts), CLIP_BATCH):
            tokens = tokenizer(texts[start:start + CLIP_BATCH], padding=True, truncation=True, return_tensors="pt")
            out = model(**tokens.to(device), pixel_values=pixels[start:start + CLIP_BATCH].to(device))
            scores += F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).tolist()
    return scores


def clip_text(prompt: str, identifier: str, class_noun: str) -> str:
    """A prompt as CLIP-T reads it: the identifier word, which means nothing to CLIP, replaced by the class noun."""
    return re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", class_noun, prompt)


def components_options(config: IDAdapterEvalConfig) -> IDAdapterTrainConfig:
    """The trainer's options that load these models; with --preset tiny, the tiny trainer's (its models and held-out
    photos, built once in <output_dir>/tiny_assets)."""
    return IDAdapterTrainConfig(**IDAdapterTrainConfig.preset_values({"preset": config.preset}), preset=config.preset,
                                output_dir=config.output_dir, base_model=config.base_model,
                                clip_vision=config.clip_vision, insightface_pack=config.insightface_pack)


def generate(config: IDAdapterEvalConfig, c, weights: ida.IDAdapterWeights, references: list[dataset.FaceImage],
             prompts: list[str], device, dtype) -> tuple[list, list[dict]]:
    """Every (prompt, seed) image, saved under <output_dir>/images/, and what each was made from. Attaches the adapter
    to ``c.unet`` and adds its K/V deltas there."""
    from tqdm.auto import tqdm

    for module in (*c.text_encoders, c.vae, c.clip_vision):
        nn.Module.to(module, device, dtype)  # torch's own cast: diffusers' .to warns on every cast with a dtype
    embeds = identity_embeds(weights.adapter, c.clip_vision, references, config.num_images, config.augment,
                             config.seed, device, dtype)
    diffusers_binding.add_kv_deltas(c.unet, weights.kv_deltas, config.weight)
    diffusers_binding.attach(c.unet, weights.adapter)
    nn.Module.to(c.unet.eval(), device, dtype)
    e_r = embeds.tokens.to(device, dtype)
    e_c = {key: vector[None].to(device) for key, vector in embeds.text.items()}
    family = base_family(c.unet)
    encoder = PromptEncoder(family, c.tokenizers, c.text_encoders, config.identifier, config.resolution)
    pipe = sampling_pipeline(c, c.unet, sdxl=family == "sdxl")
    os.makedirs(os.path.join(config.output_dir, "images"), exist_ok=True)
    runs = [(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in config.seeds]
    images, generated = [], []
    for p, prompt, seed in tqdm(runs, desc="images"):
        full_prompt = ida.identity_prompt(prompt, config.class_noun, config.identifier)
        image = generate_image(pipe, encoder, e_r, e_c, full_prompt, steps=config.steps,
                               guidance_scale=config.guidance_scale, resolution=config.resolution, seed=seed,
                               dtype=dtype, weight=config.weight)
        file = os.path.join("images", f"p{p:03d}_seed{seed}.png")
        image.save(os.path.join(config.output_dir, file))
        images.append(image)
        generated.append({"file": file, "prompt": prompt, "seed": seed})
    return images, generated


def measure_faces(analyzer, pixels: torch.Tensor, references: list[dataset.FaceImage]) -> dict:
    """``face_metrics.paper_metrics`` of images [B, H, W, 3] (each image's largest face) against the references."""
    faces, _ = embed_faces(analyzer, pixels, "largest", on_no_face="skip")
    return face_metrics.paper_metrics(faces, len(pixels), torch.stack([image.embedding for image in references]),
                                      torch.stack([image.landmarks for image in references]))


def evaluate(config: IDAdapterEvalConfig, log=print) -> dict:
    """Generates every (prompt, seed) image, measures the metrics and writes the reports; returns metrics.json's
    content."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    options = components_options(config)
    if config.preset:
        log(f"tiny models: {os.path.join(config.output_dir, 'tiny_assets')} (built there once, in about a minute)")
    c, _, heldout_dir = load_components(options)
    if config.adapter:
        weights = ida.load_idadapter(config.adapter)
    else:  # --preset tiny alone: an adapter of the tiny trainer's shape, as training starts it
        torch.manual_seed(config.seed)
        weights = ida.IDAdapterWeights(ida.IDAdapter(adapter_config(options, c.unet, c.clip_vision)).eval(), {})
    ida.check_unet_compatible(weights.config, diffusers_binding.block_specs(c.unet), "the base model")
    references_dir = config.references or os.path.join(heldout_dir, "id000")
    references, skipped = load_references(references_dir, c.analyzer)
    ida.check_same_recognizer(weights.recognizer, recognizer_fingerprint(c.analyzer))
    prompts = read_prompts(config.prompts) if config.prompts else TINY_PROMPTS

    images, generated = generate(config, c, weights, references, prompts, device, dtype)
    pixels = image_batch(images)
    measured = measure_faces(c.analyzer, pixels, references)
    scores = [None] * len(images)
    if config.clip_model or config.preset:
        # the tiny preset measures CLIP-T with a tiny random CLIP, so that its code runs too
        folder = config.clip_model or tiny.tiny_clip_model(os.path.join(config.output_dir, "tiny_assets", "clip_model"),
                                                           c.tokenizer)
        texts = [clip_text(entry["prompt"], config.identifier, config.class_noun) for entry in generated]
        scores = clip_t(folder, pixels, texts, device)
    for entry, face, score in zip(generated, measured["per_image"], scores):
        id_sim, yaw, pitch = face or (None, None, None)
        entry.update(face=face is not None, id_sim=id_sim, yaw=yaw, pitch=pitch, clip_t=score)
    report = {name: measured[name] for name in METRICS if name != "clip_t"}
    report["clip_t"] = None if scores[0] is None else float(np.mean(scores))
    report.update(
        counts={"images": measured["images"], "faces": measured["faces"], "references": len(references)},
        references=[{"file": os.path.basename(image.path), "yaw": yaw, "pitch": pitch}
                    for image, (yaw, pitch) in zip(references, measured["reference_poses"])],
        references_skipped=skipped, generated=generated,
        settings={**json.loads(config.to_json()), "references": references_dir, "prompts": prompts,
                  "num_images": config.num_images or weights.config.num_images,
                  "adapter": config.adapter or "untrained (tiny preset)"},
    )
    write_reports(config.output_dir, report)
    log(f"metrics: {os.path.join(config.output_dir, 'metrics.json')} and metrics.md; images: "
        f"{os.path.join(config.output_dir, 'images')}{os.sep}\n" + table(report))
    return report


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
    """The metrics as a Markdown table laid out like the paper's Table 1 (without Expr-Div, which is not measured)."""
    counts, settings = report["counts"], report["settings"]
    return "\n".join([
        "| method | ID-Sim ↑ | Pose-Div pitch ↑ | Pose-Div yaw ↑ | CLIP-T ↑ | faces found |",
        "|---|---|---|---|---|---|",
        f"| {os.path.basename(settings['adapter'])} (N = {settings['num_images']}) | {_number(report['id_sim'], 3)} | "
        f"{_number(report['pose_div_pitch'], 2)} | {_number(report['pose_div_yaw'], 2)} | "
        f"{_number(report['clip_t'], 3)} | {counts['faces']}/{counts['images']} "
        f"({100 * report['face_detection_rate']:.0f} %) |",
    ])


def write_reports(output_dir: str, report: dict) -> None:
    """<output_dir>/metrics.json (everything, per image too) and metrics.md (the table and how it was measured)."""
    settings, counts = report["settings"], report["counts"]
    poses = ", ".join(f"{r['yaw']:.1f}/{r['pitch']:.1f}" for r in report["references"])
    skipped = sum(len(files) for files in report["references_skipped"].values())
    notes = [
        f"{len(settings['prompts'])} prompt(s) x {len(settings['seeds'])} seed(s) = {counts['images']} images at "
        f"{settings['resolution']} px, {settings['steps']} DDIM steps, guidance {settings['guidance_scale']}, weight "
        f"{settings['weight']}. References: {counts['references']} photo(s) in `{settings['references']}`"
        + (f" ({skipped} left out: no usable face)" if skipped else "")
        + f", filled to N = {settings['num_images']}" + (" with augmented copies." if settings["augment"] else "."),
        f"ID-Sim: ArcFace cosine between each image's largest face and the references' mean vector, over the "
        f"{counts['faces']} image(s) with a face; counting the images without one as 0: "
        f"{_number(report['id_sim_all_images'], 3)}.",
        f"Pose-Div: mean absolute pitch / yaw difference in degrees between each generated face and each reference "
        f"(references' yaw/pitch: {poses}), estimated from the five detector landmarks (an approximation).",
        "CLIP-T: mean cosine between each image and its prompt (the identifier read as the class noun) in CLIP's "
        "joint space." if report["clip_t"] is not None else "CLIP-T: not measured (no --clip_model).",
        "Expr-Div (the paper's expression diversity) needs an expression classifier and is not measured.",
    ]
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(output_dir, "metrics.md"), "w", encoding="utf-8") as f:
        f.write("# IDAdapter evaluation\n\n" + table(report) + "\n\n" + "\n\n".join(notes) + "\n")
