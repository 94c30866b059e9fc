"""The ComfyExtension that lists every node of the pack."""

from comfy_api.latest import ComfyExtension, io

from .adaface import ADAFACE_NODES
from .face_nodes import FACE_NODES
from .idadapter import IDADAPTER_NODES
from .wplus import WPLUS_NODES


class IDAdapterExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*FACE_NODES, *IDADAPTER_NODES, *ADAFACE_NODES, *WPLUS_NODES]


async def comfy_entrypoint() -> IDAdapterExtension:
    return IDAdapterExtension()
