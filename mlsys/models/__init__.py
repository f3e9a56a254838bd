"""Models: the family registry (mlsys/models/family.py says how to add a family) and the built-in families.

`model.name` selects a `Family`, which declares the config dataclass, the module builder, the training FLOPs per
example (MFU), config checks and export mirrors; importing a family's file registers it. A model of your own,
outside this package, trains with `model=custom model.target=my_pkg.nets:TinyNet` (mlsys/models/custom.py).
"""

from mlsys.models.family import REGISTRY, Family, build_model, family_of, register
from mlsys.models.mlp import MLP, MLPConfig
from mlsys.models.cnn import CNN, CNNConfig
from mlsys.models.gpt import GPT, GPTConfig
from mlsys.models.llama import Llama, LlamaConfig
from mlsys.models.resnet import ResNet, ResNetConfig
from mlsys.models.vit import ViT, ViTConfig
from mlsys.models.custom import CustomConfig, import_target

__all__ = ["REGISTRY", "Family", "register", "family_of", "build_model", "import_target", "MLP", "CNN", "GPT",
           "Llama", "MLPConfig", "CNNConfig", "GPTConfig", "LlamaConfig", "CustomConfig", "ResNet", "ResNetConfig",
           "ViT", "ViTConfig"]
