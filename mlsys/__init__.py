"""mlsys: Flax NNX models trained under jit/shard_map on Hydra-configured meshes, exported to ONNX and PyTorch."""

__version__ = "0.1.0"
