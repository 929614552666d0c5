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
        self.model.to(device_to)
        self.model.device = device_to
        self.model.model_loaded_weight_memory = self.model_size()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.load(device_to, full_load=True)
        return self.model_size()

    def detach(self, unpatch_all=True):
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        self.model.model_loaded_weight_memory = 0
        return self.model


CoreModelPatcher = ModelPatcher
