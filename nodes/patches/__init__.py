"""The ComfyUI side of the adapters' patches: the one package that knows ComfyUI's patch call signatures and UNet
layout. Callers import the module of the job they need:

- :mod:`.memory`: model patchers owning the adapters' weights, loaded calls, per-device and per-step memos.
- :mod:`.unet_layout`: the UNet's transformer blocks, their downscales and block weights, state-dict and
  ``patches_replace`` keys.
- :mod:`.identity_words`: identity vectors put where their words' tokens are in the output of ``clip.tokenize``.
- :mod:`.shared`: what both patches share (attention kernel, CFG chunks, token grid, region masks, the base class).
- :mod:`.idadapter_patch`: IDAdapter's ``middle_patch`` and its cross-attention K/V weight patches.
- :mod:`.wplus_patch`: the W+ adapter's attn2 replace patch.

Patch objects are immutable once attached and shared by every ``model.clone()``. An adapter's weights belong to
ComfyUI's memory manager: the patch holds them through a model patcher that it returns from ``models()``, so
``load_models_gpu`` loads and offloads them with the MODEL (under --lowvram and dynamic VRAM too); each call casts
them to the activations' device and dtype without keeping the cast. What a patch derives per device (identity
tokens, masks, the step's sigma) is memoised under a lock: ComfyUI 0.38 runs the cond batches of one step on several
devices in threads that share the patch.
"""
