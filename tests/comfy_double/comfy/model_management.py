"""Double of `comfy.model_management` (ComfyUI 0.33.0 signatures) that records what happens.

Everything runs on the CPU; `EVENTS` records loads, unloads, frees and interrupt checks so tests can
assert that ComfyUI, not the pack, decides where models live.
"""
from __future__ import annotations

import enum
import threading
import weakref

import torch

EVENTS: list[tuple] = []
TOTAL_MEMORY = 24 * 1024**3  # what get_total_memory reports (tests may change it)


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


vram_state = VRAMState.DISABLED


class InterruptProcessingException(BaseException):
    pass


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def get_total_memory(dev=None, torch_total_too=False):
    return (TOTAL_MEMORY, TOTAL_MEMORY) if torch_total_too else TOTAL_MEMORY


def get_free_memory(dev=None, torch_free_too=False):
    used = sum(m.model.loaded_size() for m in current_loaded_models if m.model is not None)
    free = TOTAL_MEMORY - used
    return (free, free) if torch_free_too else free


def module_size(module):
    return sum(t.nbytes for t in module.state_dict().values())


def _name(patcher) -> str:
    model = patcher.model
    return type(getattr(model, "inner", model)).__name__


class LoadedModel:
    def __init__(self, model):
        self._model = weakref.ref(model)  # like ComfyUI: the list never keeps a patcher alive
        self.device = model.load_device
        self.currently_used = True

    @property
    def model(self):
        return self._model()

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        EVENTS.append(("unload", _name(self.model)))
        self.model.detach(unpatch_weights)
        return True


current_loaded_models: list[LoadedModel] = []


def cleanup_models():
    current_loaded_models[:] = [m for m in current_loaded_models if m.model is not None]


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    cleanup_models()
    for patcher in models:
        EVENTS.append(("load", _name(patcher), int(memory_required), bool(force_full_load)))
        for loaded in current_loaded_models:
            if loaded.model is patcher:
                current_loaded_models.remove(loaded)
                break
        # as ComfyUI: other models are unloaded until this one's weights plus the inference memory fit
        free_memory(patcher.model_size() - patcher.loaded_size() + memory_required, patcher.load_device,
                    keep_loaded=[m for m in current_loaded_models if m.model is patcher])
        free = get_free_memory(patcher.load_device) + patcher.loaded_size()
        lowvram = 0
        if not force_full_load and patcher.model_size() + memory_required > free:
            lowvram = max(1, free - memory_required)  # what is left for weights after the inference memory
        patcher.load(patcher.load_device, lowvram_model_memory=lowvram, full_load=force_full_load)
        current_loaded_models.insert(0, LoadedModel(patcher))


def load_model_gpu(model):
    return load_models_gpu([model])


def loaded_models(only_currently_used=False):
    cleanup_models()
    return [m.model for m in current_loaded_models if m.currently_used or not only_currently_used]


def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0, ram_required=0):
    cleanup_models()
    EVENTS.append(("free_memory", int(memory_required) if memory_required < 1e18 else "all"))
    unloaded = []
    for loaded in list(current_loaded_models):
        if loaded in keep_loaded or (device is not None and loaded.device != device):
            continue
        if get_free_memory(device) >= memory_required:
            break
        loaded.model_unload()
        current_loaded_models.remove(loaded)
        unloaded.append(loaded)
    return unloaded


def unload_all_models():
    free_memory(1e30, get_torch_device())


def unload_model_and_clones(model, unload_additional_models=True, all_devices=False):
    keep = [m for m in current_loaded_models if m.model is not model]
    free_memory(1e30, get_torch_device(), keep)


def soft_empty_cache(force=False):
    pass


_interrupt = False
_lock = threading.RLock()


def interrupt_current_processing(value=True):
    global _interrupt
    with _lock:
        _interrupt = value


def processing_interrupted():
    with _lock:
        return _interrupt


def throw_exception_if_processing_interrupted():
    global _interrupt
    EVENTS.append(("interrupt_check",))
    with _lock:
        if _interrupt:
            _interrupt = False
            raise InterruptProcessingException()


def reset():
    """Test helper: forget every loaded model, event and pending interrupt."""
    global _interrupt
    EVENTS.clear()
    current_loaded_models.clear()
    _interrupt = False
