from setuptools import find_packages, setup

setup(
    name="cogvideox-kernels",
    version="0.1.0",
    description="Kernel-first, compiler-optimized CogVideoX (arXiv 2408.06072): fused Triton kernels, "
    "a lean expert transformer, the 3D causal VAE, samplers and benchmarks.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "cogvideox", "cogvideox.*"]),
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "numpy",
        "safetensors",
        "nvidia-ml-py",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",
            "diffusers==0.42.1",
            "transformers",
            "sentencepiece",
            "peft",
            "matplotlib",
        ],
        "bench": ["matplotlib", "diffusers==0.42.1"],
        "video": ["imageio", "imageio-ffmpeg"],
        "train": ["peft"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
    },
)
