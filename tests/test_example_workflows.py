"""Example workflows: core nodes and this pack's only, consistent links, a thumbnail beside each."""

import glob
import json
import os

import pytest

from declared_nodes import declared_nodes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
CORE_NODES = {"LoadImage", "PreviewImage", "SaveImage", "CheckpointLoaderSimple", "CLIPTextEncode", "KSampler",
              "EmptyLatentImage", "VAEDecode", "CLIPVisionLoader", "ConditioningConcat", "SolidMask", "MaskComposite",
              "ConditioningSetMask", "ConditioningCombine"}


def test_there_are_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_is_consistent(path):
    wf = json.load(open(path))
    assert os.path.isfile(path[:-5] + ".jpg"), "ComfyUI's template browser shows <name>.jpg beside <name>.json"
    ours = declared_nodes()
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in nodes.values():
        assert node["type"] in CORE_NODES or node["type"] in ours, node["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == kind
        assert link_id in out["links"] and inp["link"] == link_id
