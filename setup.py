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
    ],
    extras_require={
        "test": ["pytest>=8", "diffusers>=0.30", "ruff>=0.6"],
        "openvino": ["openvino>=2024.0"],  # benchmarks/bench_vs_diffusers.py --peers: OpenVINO as a peer
    },
)
