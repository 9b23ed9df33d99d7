from setuptools import setup

setup(
    name="setseq",
    version="0.1.0",
    description="Set-and-Sequence: dynamic-concept personalization of video Diffusion Transformers",
    python_requires=">=3.11",
    packages=["model", "lora", "train", "sample", "weights", "toyworld", "setseq"],
    install_requires=[
        # Any range must admit 2.13.0 (the CPU wheel these machines carry); install with torch==2.13.0.
        "torch>=2.4",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.5",
        "numpy>=1.24",
        "tqdm>=4.66",
    ],
    extras_require={
        # Reference implementations, used only by the parity tests; never imported by the model code.
        "test": ["pytest>=8", "ruff>=0.6", "diffusers>=0.35", "transformers>=4.50", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["setseq=setseq.cli:main"]},
)
