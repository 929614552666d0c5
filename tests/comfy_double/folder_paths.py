"""Double of ComfyUI's `folder_paths` (same functions and semantics), rooted at a folder tests choose."""
from __future__ import annotations

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
base_path = ""
models_dir = ""
output_directory = ""
input_directory = ""
temp_directory = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def set_base(path: str) -> None:
    """Test helper: lay out models/, output/, input/, temp/ under `path` (ComfyUI's --base-directory)."""
    global base_path, models_dir, output_directory, input_directory, temp_directory
    base_path = str(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    input_directory = os.path.join(base_path, "input")
    temp_directory = os.path.join(base_path, "temp")
    folder_names_and_paths.clear()
    for name in ("diffusion_models", "vae", "text_encoders", "clip"):
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], set(supported_pt_extensions))
    for folder in (output_directory, input_directory, temp_directory):
        os.makedirs(folder, exist_ok=True)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    if folder_name in folder_names_and_paths:
        paths, _ = folder_names_and_paths[folder_name]
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    paths, extensions = folder_names_and_paths[folder_name]
    names = set()
    for folder in paths:
        for root, _, files in os.walk(folder, followlinks=True):
            for file in files:
                if not extensions or os.path.splitext(file)[1].lower() in extensions:
                    names.add(os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/"))
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    for folder in folder_names_and_paths[folder_name][0]:
        path = os.path.join(folder, os.path.normpath(filename))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path


def get_output_directory() -> str:
    return output_directory


def get_input_directory() -> str:
    return input_directory


def get_temp_directory() -> str:
    return temp_directory


def get_annotated_filepath(name: str) -> str:
    return os.path.join(input_directory, name)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0):
    """ComfyUI's numbering: the next counter after existing `<prefix>_NNNNN_*` files."""
    filename_prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((os.path.abspath(output_dir), os.path.abspath(full_output_folder))) != os.path.abspath(output_dir):
        raise Exception("Saving image outside the output folder is not allowed.")
    os.makedirs(full_output_folder, exist_ok=True)
    counters = []
    for name in os.listdir(full_output_folder):
        if name.startswith(filename + "_"):
            digits = name[len(filename) + 1:].split(".")[0].split("_")[0]
            if digits.isdigit():
                counters.append(int(digits))
    return full_output_folder, filename, max(counters, default=0) + 1, subfolder, filename_prefix
