"""Face nodes: Load InsightFace, Face Embed, Face Embeds Combine, Save / Load Face Embeds.

Thin: inputs are checked and handed to ``face/`` and ``arch/``. (Named face_nodes because ``face/`` is the
package that does the work.)
"""

from __future__ import annotations

import folder_paths
from comfy.utils import ProgressBar
from comfy_api.latest import io

from .arch import face_embeds as fe
from .arch.output_files import PREFIX_TOOLTIP, save_to_new_file
from .face import insightface_backend as backend

CATEGORY = "face identity"
InsightFace = io.Custom("INSIGHTFACE")
FaceEmbeds = io.Custom("FACE_EMBEDS")
NO_PACK = "(no pack found: put antelopev2 into models/insightface/models/)"


class LoadInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        packs = backend.list_packs(folder_paths.get_folder_paths("insightface")) or [NO_PACK]
        return io.Schema(
            node_id="IDA_LoadInsightFace",
            display_name="Load InsightFace",
            category=CATEGORY,
            description="Loads an insightface detector + ArcFace recognizer pack from models/insightface/models/.",
            inputs=[
                io.Combo.Input("pack", options=packs, tooltip="folder under models/insightface/models/"),
                io.Combo.Input(
                    "provider",
                    options=list(backend.PROVIDER_CHOICES),
                    default="auto",
                    tooltip="onnxruntime execution provider; the one really used is reported in 'info'",
                ),
                io.Int.Input("det_size", default=640, min=128, max=2048, step=32, tooltip="detector input size"),
            ],
            outputs=[InsightFace.Output(), io.String.Output("info", tooltip="pack and provider in use")],
        )

    @classmethod
    def execute(cls, pack, provider, det_size) -> io.NodeOutput:
        pack_dir = backend.find_pack_dir(folder_paths.get_folder_paths("insightface"), pack)
        analyzer = backend.load_analyzer(pack_dir, provider, det_size)
        return io.NodeOutput(analyzer, analyzer.report)


class FaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_FaceEmbed",
            display_name="Face Embed",
            category=CATEGORY,
            description="Detects faces, aligns them to the ArcFace template and computes unit-norm identity vectors.",
            inputs=[
                InsightFace.Input("insightface"),
                io.Image.Input("image"),
                io.Combo.Input(
                    "face_selection",
                    options=list(backend.FACE_SELECTIONS),
                    default="largest",
                    tooltip="per image: the largest face, the face at face_index (left to right), the face under "
                    "face_mask (at least half of its box), or every face. Photos with several people: pick one here "
                    "and feed these face_embeds to any method's encode node, which then uses only that face",
                ),
                io.Int.Input("face_index", default=0, min=0, max=64, tooltip="used when face_selection is index"),
                io.Combo.Input(
                    "on_no_face",
                    options=list(backend.NO_FACE_POLICIES),
                    default="error",
                    tooltip="error: stop the run; skip: leave that image out (embeds may be empty)",
                ),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="used when face_selection is 'in mask': white where the person is"),
            ],
            outputs=[FaceEmbeds.Output(), io.Image.Output("aligned_faces", tooltip="112x112 aligned crops")],
        )

    @classmethod
    def execute(cls, insightface, image, face_selection, face_index, on_no_face, face_mask=None) -> io.NodeOutput:
        bar = ProgressBar(int(image.shape[0]) if image.ndim == 4 else 1)
        embeds, crops = backend.embed_faces(
            insightface,
            image,
            face_selection,
            face_index,
            on_no_face,
            progress=lambda done, total: bar.update_absolute(done, total),
            mask=face_mask,
        )
        return io.NodeOutput(embeds, crops)


class FaceEmbedsCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_FaceEmbedsCombine",
            display_name="Face Embeds Combine",
            category=CATEGORY,
            description="Averages (mean, norm-mean) or stacks (concat) the faces of one or more FACE_EMBEDS.",
            inputs=[
                FaceEmbeds.Input("embeds_1"),
                io.Combo.Input("mode", options=list(fe.COMBINE_MODES), default="norm-mean"),
                FaceEmbeds.Input("embeds_2", optional=True),
                FaceEmbeds.Input("embeds_3", optional=True),
                FaceEmbeds.Input("embeds_4", optional=True),
            ],
            outputs=[FaceEmbeds.Output()],
        )

    @classmethod
    def execute(cls, embeds_1, mode, embeds_2=None, embeds_3=None, embeds_4=None) -> io.NodeOutput:
        return io.NodeOutput(fe.combine([embeds_1, embeds_2, embeds_3, embeds_4], mode))


class SaveFaceEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_SaveFaceEmbeds",
            display_name="Save Face Embeds",
            category=CATEGORY,
            description="Writes FACE_EMBEDS as safetensors under the output folder (face_embeds/ by default).",
            inputs=[FaceEmbeds.Input("face_embeds"),
                    io.String.Input("filename_prefix", default="face_embeds/face", tooltip=PREFIX_TOOLTIP)],
            outputs=[io.String.Output("path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, face_embeds, filename_prefix) -> io.NodeOutput:
        path = save_to_new_file(folder_paths.get_output_directory(), filename_prefix,
                                lambda path: fe.save_face_embeds(face_embeds, path, replace=False))
        return io.NodeOutput(path)


class LoadFaceEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadFaceEmbeds",
            display_name="Load Face Embeds",
            category=CATEGORY,
            description="Reads a FACE_EMBEDS safetensors file (output/face_embeds/ or models/face_embeds/).",
            inputs=[io.Combo.Input("file", options=folder_paths.get_filename_list("face_embeds"))],
            outputs=[FaceEmbeds.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        return io.NodeOutput(fe.load_face_embeds(folder_paths.get_full_path_or_raise("face_embeds", file)))


FACE_NODES = [LoadInsightFace, FaceEmbed, FaceEmbedsCombine, SaveFaceEmbeds, LoadFaceEmbeds]
