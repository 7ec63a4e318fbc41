"""The specs (configs/) and the bundled data (data/) that ship with vlrlhf.

In a source checkout they are the repository's own folders. An installed wheel carries a
copy in vlrlhf/bundled/ (setup.py copies them at build time), so `vlrlhf demo` and
`vlrlhf run configs/demo_sft.yaml` work wherever the package is installed: in a container,
in a virtual environment, from any working directory. The specs' relative data paths
(../data/shapes) hold in both layouts.
"""

from __future__ import annotations

import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent
FOLDERS = ("configs", "data")


def bundle_root() -> pathlib.Path:
    """The folder holding configs/ and data/: the checkout when there is one, else the
    copy inside the installed package."""
    for root in (PACKAGE.parent, PACKAGE / "bundled"):
        if all((root / name).is_dir() for name in FOLDERS):
            return root
    raise FileNotFoundError(f"neither {PACKAGE.parent} nor {PACKAGE / 'bundled'} holds configs/ and data/: "
                            "this vlrlhf was installed without its bundled specs and data")


def bundled_spec(path: str | pathlib.Path) -> pathlib.Path | None:
    """A relative spec path that names a shipped spec (configs/demo_sft.yaml), resolved in
    the bundle; None when it names none."""
    path = pathlib.Path(path)
    if path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return None
    try:
        candidate = bundle_root() / path
    except FileNotFoundError:
        return None
    return candidate if candidate.is_file() else None
