"""Backbones: log-mel maps ``(B, C, F, T)`` in, class logits out."""

from models.backbones.base import Backbone, ConvBlock
from models.backbones.bcresnet import BCResNet
from models.backbones.cbam import CBAM
from models.backbones.crnn import CRNN
from models.backbones.tinycnn import TinyCNN
from models.backbones.tinycnn_cbam import TinyCNNCBAM

__all__ = ["BCResNet", "CBAM", "CRNN", "Backbone", "ConvBlock", "TinyCNN", "TinyCNNCBAM"]
