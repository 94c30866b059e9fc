"""Memory-manager glue and per-device state: model patchers that own an adapter's weights, so that ComfyUI's memory
manager loads and offloads them with the MODEL (:func:`module_patcher`); a call of such a module with its weights
loaded (:func:`run_loaded`); values memoised per device (:class:`PerDeviceMemo`) and the step's sigma
(:class:`StepSigma`), safe when ComfyUI runs the cond batches of one step on several devices in threads.
"""

from __future__ import annotations

import threading
import weakref

import torch


def module_patcher(module: torch.nn.Module):
    """A ComfyUI model patcher owning ``module``, so that ComfyUI's memory manager loads and offloads it.

    ComfyUI 0.38 builds patch models with ``comfy.model_patcher.CoreModelPatcher``, which main.py rebinds at
    startup to the dynamic-VRAM patcher where that is on (so it is looked up here, at call time); 0.3.x has only
    ``ModelPatcher``. Make one per loaded file and keep it as long as the module: every node using that file
    shares it, and with it a single copy of the weights.
    """
    import comfy.model_management
    import comfy.model_patcher

    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher_class(module, load_device=comfy.model_management.get_torch_device(),
                         offload_device=comfy.model_management.unet_offload_device())


def run_loaded(patcher, *args):
    """The patcher's module called on ``args``, loaded by ComfyUI's memory manager, on its load device.

    Under --lowvram the manager may leave part of the module offloaded, so the call sees every parameter on the
    load device as float32 for this call only (a no-op for those already there); nothing keeps that copy.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    module = patcher.model
    device = patcher.load_device
    params = {name: p.to(device, torch.float32) for name, p in module.named_parameters()}
    buffers = {name: b.to(device) for name, b in module.named_buffers()}
    return torch.func.functional_call(module, {**params, **buffers}, args, strict=True, tie_weights=False)


class PerDeviceMemo:
    """Values computed once per key, where a key starts with the torch.device the value lives on.

    Safe when several threads (one per device) ask at once. A value is computed outside the lock, so one device's
    copy never waits for another's; if two threads race on one key, both get the first value stored.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict = {}

    def get(self, key: tuple, compute):
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = compute()
        with self._lock:
            return self._values.setdefault(key, value)

    def release_accelerator_values(self) -> None:
        """Forgets every value not on the CPU (callers still holding one keep it alive until they are done)."""
        with self._lock:
            self._values = {k: v for k, v in self._values.items() if k[0].type == "cpu"}


class StepSigma:
    """The current step's sigma as a float, read off each device once per step (every block of a step sees the
    same ``sigmas`` tensor; each multi-GPU thread has its own), without keeping the tensor alive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict = {}  # device -> (weakref to the sigmas tensor, its value)

    def get(self, sigmas: torch.Tensor) -> float:
        with self._lock:
            seen = self._seen.get(sigmas.device)
        if seen is not None and seen[0]() is sigmas:
            return seen[1]
        sigma = float(sigmas.detach().max())
        with self._lock:
            self._seen[sigmas.device] = (weakref.ref(sigmas), sigma)
        return sigma
