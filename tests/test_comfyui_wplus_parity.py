"""The W+ adapter's trainer<->node parity on a real ComfyUI (COMFYUI_PATH), in one process with ComfyUI's `nodes`:
the trainer's diffusers UNet with ``attach_wplus`` equals ComfyUI's UNet patched by Apply W+ Adapter, same weights,
fp32."""

import pytest

from test_comfyui import make_work_dir, needs_comfyui, run_check

pytestmark = needs_comfyui

BLOCKS = ["input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0", "output_3_0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("comfy_wplus_parity") / "work")
    run_check(work, "make_sd15_assets", {})
    return work


def test_trainer_forward_equals_comfyui_unet_with_apply_wplus_adapter(work):
    result = run_check(work, "wplus_trainer_parity_sd15", {})
    assert result["dtype"] == "torch.float32"
    assert result["blocks"] == result["installed"] == result["patched"] == BLOCKS
    assert result["adapter_effect"] > 1e-3 and result["uncond_effect"] > 1e-4  # both CFG halves get a residual
    assert result["close"] == {"cfg": True, "cond": True}, result
    assert max(result["max_diff"].values()) <= 1e-5, result
