"""Packaging hook: the wheel carries configs/ and data/ as vlrlhf/bundled/ (vlrlhf.bundle).
Everything else is in pyproject.toml."""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildWithBundle(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's own folders
            return
        for name in ("configs", "data"):
            target = pathlib.Path(self.build_lib) / "vlrlhf" / "bundled" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))


setup(cmdclass={"build_py": BuildWithBundle})
