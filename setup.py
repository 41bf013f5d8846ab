from setuptools import find_packages, setup

setup(
    name="mmserver",
    version="0.1.0",
    description="A fast multimodal (InternVL) inference server",
    packages=find_packages(include=["mmserver", "mmserver.*"]),
    python_requires=">=3.10",
    # torch is not pinned here so GPU machines keep their CUDA build; the CPU test path pins
    # torch==2.13.0 in requirements-ci.txt.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.52",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.60",
        "aiohttp>=3.9",
        "av>=12",
        "uvloop>=0.19",
        "rpyc>=6.0",
        "prometheus-client>=0.20",
    ],
    extras_require={"test": ["pytest>=8"], "triton": ["triton>=3.0"]},
)
