"""Double of `comfy.model_patcher.ModelPatcher`: same constructor and the methods model management uses."""
from __future__ import annotations

import uuid


from . import model_management


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if not hasattr(self.model, "device"):  # ComfyUI writes these onto the module
            self.model.device = offload_device
        elif self.model.device is None:
            self.model.device = offload_device
        self.model.model_loaded_weight_memory = 0
        self.load_device = load_device
        self.offload_device = offload_device
        self.clone_base_uuid = uuid.uuid4()
        self.parent = None

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def current_loaded_device(self):
        return self.model.device

    def is_dynamic(self):
        return False

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def model_patches_models(self):
        return []

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        """As ComfyUI: with a budget (`lowvram_model_memory` > 0, not `full_load`), comfy.ops layers (those with
        `comfy_cast_weights`) are loaded largest first while they fit; the rest stay on the offload device and
        are cast on every call. Other modules are always loaded."""
        loaded, offloaded = 0, 0
        layers = [(model_management.module_size(m), n, m) for n, m in self.model.named_modules()
                  if hasattr(m, "comfy_cast_weights")]
        layers.sort(key=lambda item: item[0], reverse=True)
        for size, _, module in layers:
            if full_load or lowvram_model_memory <= 0 or loaded + size < lowvram_model_memory:
                if hasattr(module, "prev_comfy_cast_weights"):
                    module.comfy_cast_weights = module.prev_comfy_cast_weights
                    del module.prev_comfy_cast_weights
                loaded += size
                continue
            if not hasattr(module, "prev_comfy_cast_weights"):
                module.prev_comfy_cast_weights = module.comfy_cast_weights
            module.comfy_cast_weights = True
            offloaded += size
        self.model.to(device_to)  # on the CPU double: the "offloaded" layers only change how they are called
        self.model.device = device_to
        self.model.model_lowvram = offloaded > 0
        self.model.model_loaded_weight_memory = self.model_size() - offloaded
        if offloaded:
            model_management.EVENTS.append(("partial", type(getattr(self.model, "inner", self.model)).__name__,
                                            self.model_size() - offloaded, offloaded))

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.load(device_to, full_load=True)
        return self.model_size()

    def detach(self, unpatch_all=True):
        for module in self.model.modules():
            if hasattr(module, "prev_comfy_cast_weights"):
                module.comfy_cast_weights = module.prev_comfy_cast_weights
                del module.prev_comfy_cast_weights
        self.model.model_lowvram = False
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        self.model.model_loaded_weight_memory = 0
        return self.model


CoreModelPatcher = ModelPatcher
