"""Build glue: setuptools packages + a CMake-built pybind11 extension (fastforget._native)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DFASTFORGET_EXT_NAME={out.name}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


packages = ["fastforget"] + [f"fastforget.{p}" for p in find_packages("fastforget")]
packages += ["fastforget.kernels"] + [f"fastforget.kernels.{p}" for p in find_packages("kernels")]
packages += ["fastforget.export"] + [f"fastforget.export.{p}" for p in find_packages("export")]

setup(
    packages=packages,
    ext_modules=[CMakeExtension("fastforget._native", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
