from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.1.0",
    description="Stable Diffusion v1 (Rombach et al., CVPR 2022): a faithful, modern reimplementation",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "pytorch-lightning>=2.1,<3",
        "omegaconf>=2.3",
        "transformers>=4.40",
        "einops>=0.7",
        "numpy>=1.24",
        "pillow>=10",
        "invisible-watermark>=0.2",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "open_clip_torch>=2.20",
        "ftfy>=6.1",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.6",
        "torchsde>=0.2.6",  # Brownian-tree noise of the SDE samplers
    ],
    package_data={"ldm.server": ["static/*"]},
    extras_require={
        "eval": ["matplotlib>=3.7", "scipy>=1.10"],
        "test": [
            "pytest>=8",
            "diffusers>=0.30",
            "peft>=0.13",
            "ruff>=0.6",
            "httpx>=0.27",
            "selenium>=4.20",
            "matplotlib>=3.7",
            "scipy>=1.10",
            "torchmetrics>=1.0",
            "openvino>=2024.0",  # tests/test_openvino_backend.py
        ],
        "openvino": ["openvino>=2024.0"],  # --backend openvino; benchmarks/bench_vs_diffusers.py --peers
    },
)
