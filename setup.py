"""fairseq_ext: long-context language modelling systems as a fairseq plugin (--user-dir fairseq_ext)."""
from setuptools import find_packages, setup

setup(
    name="fairseq_ext",
    version="0.1.0",
    description="ALiBi, Transformer-XL, adaptive span, fast-weight and SHA-RNN language models for fairseq",
    packages=find_packages(include=["fairseq_ext", "fairseq_ext.*"]),
    python_requires=">=3.11",
    # The stack is pinned and installed by scripts/install.sh (torch==2.13.0, fairseq-fixed==0.12.3.1 with
    # --no-deps); declaring it here would let pip resolve torch, which must never happen.
    install_requires=[],
)
