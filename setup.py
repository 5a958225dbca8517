"""Package set-up for distill_jax (tool settings live in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    name="distill_jax",
    version="0.1.0",
    description="Knowledge distillation for sequential recommenders in JAX/Flax.",
    python_requires=">=3.11",
    # benchmarks/ is a package too, but it runs from a checkout
    # (`python -m benchmarks.quality ...`), so it is not installed.
    packages=find_packages(include=["distill_jax", "distill_jax.*", "configs"]),
    # The CPU kernel's source, compiled on first use (distill_jax/losses).
    package_data={"distill_jax.losses": ["*.cc"]},
    install_requires=[
        "absl-py",
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.10",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # Progress bars (distill_jax/progress.py).
        "tqdm>=4.66",
        "numpy>=1.26",
        "pyarrow>=15",
        # int8 students (distill_jax/compress/quantize.py).
        "qwix>=0.1.8",
        # jax.export's serializer (the exported artefact, distill_jax/compress/export.py).
        "flatbuffers>=24",
        # jax's compilation cache needs it to keep under a size (distill_jax/compile_cache.py).
        "filelock>=3.12",
        # TF-IDF + truncated SVD text features (distill_jax/data/features.py).
        "scikit-learn>=1.4",
    ],
    extras_require={
        # nbclient + ipykernel run notebooks/ in the test suite (tests/test_notebooks.py);
        # tensorboard reads the event files back (tests/test_report.py).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            # Property tests (tests/test_properties_*.py).
            "hypothesis>=6.100",
            "ruff>=0.6",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "tensorboard>=2.16",
        ],
        "notebooks": ["jupyter", "ipykernel"],
        # Other systems measured beside ours (benchmarks/peers/); the package never imports
        # them. torch's CPU wheels: pip install torch --index-url
        # https://download.pytorch.org/whl/cpu first. tensorboard reads our runs' events.
        "peers": ["torch", "recbole>=1.2", "tensorboard>=2.16"],
        "tpu": ["jax[tpu]>=0.7"],
        "gpu": ["jax[cuda12]>=0.7"],
    },
)
