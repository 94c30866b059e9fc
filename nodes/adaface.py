"""AdaFace nodes: Load AdaFace, AdaFace Encode, Save AdaFace Embedding.

A face becomes 16 ordinary prompt tokens (the SD1.5 text encoder's input space), so the identity needs no MODEL
patch and works with any SD1.5 checkpoint, LoRA, ControlNet or AnimateDiff.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from .arch import adaface as ada
from .arch import adaface_official
from .arch.arc2face import load_arc2face_encoder
from .arch.face_embeds import FaceEmbeds as FaceEmbedsValue
from .arch.files import write_safetensors
from .errors import ConfigError, ModelFolderError, PackError
from .face_nodes import CATEGORY, FaceEmbeds
from .patches.identity_words import IdentityWord, tokenize_with_identities
from .patches.memory import module_patcher, run_loaded
from .resident import ResidentFile
from .shared_inputs import IdentityWordsType, chained_words, identity_words_input

AdaFaceType = io.Custom("ADAFACE")
BUNDLED_ENCODER = "(bundled in the inverter file)"
ENCODER_CONFIG = "config.json"
OFFICIAL_SUFFIXES = (".pt", ".ckpt")
# the text encoders ComfyUI's CLIP tokenizes for, by family (reference/comfyui-api.md §4.1)
FAMILY_OF_ENCODERS = {("l",): "sd15", ("h",): "sd21", ("g", "l"): "sdxl"}
SD15_ENCODER = "l"


@dataclass
class LoadedAdaFace:
    """ADAFACE: the face -> tokens module of one inverter file and its Arc2Face encoder, owned by a ComfyUI model
    patcher (loaded and offloaded by the memory manager), and what the tokens need to be placed."""

    config: ada.AdaFaceConfig
    family: str
    patcher: object
    has_pad_embeddings: bool


def _encoder_folders() -> dict[str, str]:
    """Folders under models/adaface/ holding an Arc2Face encoder (config.json + weights), by their relative name."""
    found, seen = {}, set()
    for root in folder_paths.get_folder_paths("adaface"):
        if not os.path.isdir(root):
            continue
        for folder, dirs, files in os.walk(root, followlinks=True):
            seen.add(os.path.realpath(folder))
            # linked folders are followed once: a link back up the tree must not make the walk endless
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in seen]
            if ENCODER_CONFIG in files:
                found.setdefault(os.path.relpath(folder, root).replace(os.sep, "/"), folder)
    return found


def _inverter_files() -> list[str]:
    """models/adaface/ files, less the weights inside Arc2Face encoder folders."""
    encoders = [name + "/" for name in _encoder_folders()]
    return [f for f in folder_paths.get_filename_list("adaface")
            if not any(f.replace(os.sep, "/").startswith(folder) for folder in encoders)]


def _read_inverter(path: str) -> ada.AdaFaceWeights:
    if path.lower().endswith(OFFICIAL_SUFFIXES):
        return adaface_official.to_adaface_weights(adaface_official.read_official_adaface(path))
    return ada.load_adaface(path)


_resident = ResidentFile()


def load_cached(inverter_path: str, encoder_folder: str | None) -> LoadedAdaFace:
    def load():
        weights = _read_inverter(inverter_path)
        if encoder_folder is not None:
            encoder = load_arc2face_encoder(encoder_folder)
        elif weights.arc2face is not None:
            encoder = weights.arc2face
        else:
            raise ModelFolderError(
                f"{os.path.basename(inverter_path)} holds no Arc2Face ID encoder: put Arc2Face's 'encoder' "
                "folder (config.json + pytorch_model.bin or model.safetensors, from FoivosPar/Arc2Face) into "
                "models/adaface/ and choose it as arc2face_encoder, or convert the inverter with "
                "tools/convert_adaface.py --arc2face_encoder to bundle it")
        module = ada.AdaFaceEncoder(weights, encoder)
        return LoadedAdaFace(weights.config, ada.FAMILY, module_patcher(module),
                             weights.pad_embeddings is not None)

    encoder_config = () if encoder_folder is None else (os.path.join(encoder_folder, ENCODER_CONFIG),)
    return _resident.get((inverter_path, *encoder_config), load)


class LoadAdaFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadAdaFace",
            display_name="Load AdaFace",
            category=CATEGORY,
            description="Loads an AdaFace prompt inverter (ours, adaface/1 safetensors, or an official .pt, read "
            "without running its pickle) and the Arc2Face ID encoder from models/adaface/.",
            inputs=[
                io.Combo.Input("inverter", options=_inverter_files(),
                               tooltip="adaface/1 .safetensors or an official AdaFace .pt (arc2face branch)"),
                io.Combo.Input("arc2face_encoder", options=[BUNDLED_ENCODER, *sorted(_encoder_folders())],
                               tooltip="a folder under models/adaface/ holding Arc2Face's encoder (config.json + "
                               "weights); or the one bundled in an adaface/1 file"),
            ],
            outputs=[AdaFaceType.Output()],
        )

    @classmethod
    def execute(cls, inverter, arc2face_encoder) -> io.NodeOutput:
        inverter_path = folder_paths.get_full_path_or_raise("adaface", inverter)
        encoder_folder = None
        if arc2face_encoder != BUNDLED_ENCODER:
            encoder_folder = _encoder_folders().get(arc2face_encoder)
            if encoder_folder is None:
                raise ModelFolderError(f"no Arc2Face encoder folder {arc2face_encoder!r} under models/adaface/ "
                                       f"(a folder holding {ENCODER_CONFIG} and the weights)")
        return io.NodeOutput(load_cached(inverter_path, encoder_folder))


def identity_vectors(adaface: LoadedAdaFace, face_embeds, strength: float):
    """The identity's AdaFace tokens [K, D] on the CPU, from all faces of ``face_embeds`` (mean of the unit
    ArcFace vectors, re-normalised, as the official code averages several photos)."""
    if not isinstance(face_embeds, FaceEmbedsValue) or len(face_embeds) == 0:
        raise PackError("face_embeds holds no face: the photos need a detectable face (Face Embed)")
    if strength != 1.0 and not adaface.has_pad_embeddings:
        raise ConfigError("a strength other than 1 mixes the tokens with the padding prompt's embeddings, which "
                          "this AdaFace file does not hold: use strength 1")
    return run_loaded(adaface.patcher, face_embeds.embeds, strength).cpu()


def _family_of(clip) -> str:
    encoders = tuple(sorted(clip.tokenize("")))
    return FAMILY_OF_ENCODERS.get(encoders, f"a model with text encoders {list(encoders)}")


class AdaFaceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_AdaFaceEncode",
            display_name="AdaFace Encode",
            category=CATEGORY,
            description="Encodes a prompt with the face's 16 AdaFace tokens where the placeholder word is (any "
            "SD1.5 checkpoint; no MODEL patch). More people: identity_words.",
            inputs=[
                io.Clip.Input("clip"),
                AdaFaceType.Input("adaface"),
                FaceEmbeds.Input("face_embeds", tooltip="one person's faces: several photos are averaged"),
                io.String.Input("text", multiline=True, default="a photo of z, smiling, in a garden"),
                io.String.Input("placeholder", default="z",
                                tooltip="the word replaced by the 16 identity tokens; when the text has none, the "
                                "tokens are appended at the end (as the official AdaFace does)"),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="the official out_id_embs_cfg_scale: below 1 mixes the tokens towards the "
                               "padding prompt's, above 1 away from it"),
                identity_words_input(),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, adaface, face_embeds, text, placeholder, strength, identity_words=None) -> io.NodeOutput:
        check_clip_family(clip, adaface)
        own = adaface_word(adaface, face_embeds, placeholder, strength, append_if_missing=True)
        tokens = tokenize_with_identities(clip, text, [own, *(identity_words or [])])
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


def check_clip_family(clip, adaface: LoadedAdaFace) -> None:
    family = _family_of(clip)
    if family != adaface.family:
        raise PackError(f"this AdaFace writes {adaface.family} prompt tokens (CLIP-L, "
                        f"{adaface.config.inverter.hidden_size} wide); the CLIP belongs to {family}: use an "
                        f"{adaface.family} checkpoint's CLIP")


def adaface_word(adaface: LoadedAdaFace, face_embeds, placeholder: str, strength: float,
                 append_if_missing: bool = False) -> IdentityWord:
    """The face's 16 AdaFace tokens on ``placeholder`` (SD1.5's CLIP-L)."""
    return IdentityWord(ada.check_placeholder(placeholder.strip()),
                        {SD15_ENCODER: identity_vectors(adaface, face_embeds, strength)}, "AdaFace",
                        append_if_missing=append_if_missing)


class AdaFaceIdentityWord(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_AdaFaceIdentityWord",
            display_name="AdaFace Identity Word",
            category=CATEGORY,
            description="One more person for AdaFace Encode (or IDAdapter Text Encode): this face's 16 AdaFace tokens on "
            "its own placeholder, e.g. 'y' in 'z and y at a cafe'. For one person per region, use a masked "
            "conditioning (Conditioning (Set Mask)) per person instead.",
            inputs=[
                AdaFaceType.Input("adaface"),
                FaceEmbeds.Input("face_embeds", tooltip="this person's faces: several photos are averaged"),
                io.String.Input("placeholder", default="y", tooltip="one letter word, other than the others'"),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05),
                identity_words_input(),
            ],
            outputs=[IdentityWordsType.Output()],
        )

    @classmethod
    def execute(cls, adaface, face_embeds, placeholder, strength, identity_words=None) -> io.NodeOutput:
        return io.NodeOutput(chained_words(identity_words, adaface_word(adaface, face_embeds, placeholder, strength)))


EMBEDDING_KEYS = ("clip_l", "emb_params")  # ComfyUI reads clip_l for SD1.5; A1111-style front-ends emb_params


class SaveAdaFaceEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_SaveAdaFaceEmbedding",
            display_name="Save AdaFace Embedding",
            category=CATEGORY,
            description="Saves the face's 16 AdaFace tokens as a textual-inversion embedding in models/embeddings/: "
            "any workflow then uses the identity by writing embedding:<name> in a prompt, with no pack node.",
            inputs=[
                AdaFaceType.Input("adaface"),
                FaceEmbeds.Input("face_embeds", tooltip="one person's faces: several photos are averaged"),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05),
                io.String.Input("name", default="adaface_person", tooltip="the file name, used as embedding:<name>"),
                io.Boolean.Input("overwrite", default=False, tooltip="replace an embedding of that name"),
            ],
            outputs=[io.String.Output("embedding", tooltip="embedding:<name>, to write into any prompt")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adaface, face_embeds, strength, name, overwrite) -> io.NodeOutput:
        name = name.strip()
        if not name or name != os.path.basename(name) or name.startswith(".") or ":" in name:
            raise ConfigError(f"the embedding name {name!r} must be a plain file name (no folders or ':'), "
                              "e.g. adaface_anna")
        folder = folder_paths.get_folder_paths("embeddings")[0]
        path = os.path.join(folder, name + ".safetensors")
        vectors = identity_vectors(adaface, face_embeds, strength).float().contiguous()
        os.makedirs(folder, exist_ok=True)
        try:  # without overwrite, the file goes in place only if nothing has that name, even a save racing this one
            write_safetensors({key: vectors.clone() for key in EMBEDDING_KEYS}, path,
                              {"format": "adaface-embedding/1", "family": adaface.family}, replace=overwrite)
        except FileExistsError:
            raise ConfigError(f"{path} exists: choose another name or turn on overwrite") from None
        return io.NodeOutput(f"embedding:{name}")


ADAFACE_NODES = [LoadAdaFace, AdaFaceEncode, AdaFaceIdentityWord, SaveAdaFaceEmbedding]
