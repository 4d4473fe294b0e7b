"""Packs csrc/ into wheels as vllm_indexer_epilog/_csrc, where backends/cpu.py looks when not run from a checkout.

The CPU kernel is not compiled here: it is built with -march=native on the machine that runs it (first
CPU call, cached; see backends/cpu.py), which a wheel built elsewhere could not be, and pip's isolated
build environment has no torch to compile against.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "vllm_indexer_epilog" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        csrc = Path(__file__).parent / "csrc"
        for src in csrc.rglob("*"):
            if src.suffix in (".cpp", ".h"):
                dest = target / src.relative_to(csrc)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


setup(cmdclass={"build_py": BuildPyWithCsrc})
