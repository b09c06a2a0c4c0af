"""The embedded sample: 6,000 real MNIST digits shipped inside the package."""

from __future__ import annotations

from importlib import resources

SAMPLE_NAME = "mnist-6k.parquet"


def sample_path() -> str:
    """Local path of the sample Parquet file (Hugging Face `image` + `label` layout)."""
    return str(resources.files("pipeline").joinpath("data", SAMPLE_NAME))


if __name__ == "__main__":  # `python -m pipeline.sample` prints the path, for scripts
    print(sample_path())
