"""Random-init networks in the published file formats of the field's metrics (syncnet_python's SyncNet, an ArcFace
ONNX, the FID Inception state dict, the TorchScript I3D), for tests of their loaders and of tsd-eval's field section."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from temposyncdiff.metrics.syncnet_python import SyncNetV2


def random_syncnet(seed: int = 0) -> SyncNetV2:
    """Random weights and BatchNorm statistics (so a load that dropped any tensor would show)."""
    torch.manual_seed(seed)
    net = SyncNetV2()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def save_syncnet(path: Path, seed: int = 0) -> Path:
    """``syncnet_v2.model`` as syncnet_python's ``loadParameters`` reads it: a torch.save'd state dict."""
    torch.save(random_syncnet(seed).state_dict(), path)
    return path


def save_arcface_onnx(path: Path) -> Path:
    """A random graph with ArcFace's interface: ``input.1`` [N,3,112,112] float -> [N,512], dynamic batch."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AvgPool2d(9), nn.Flatten(), nn.Linear(72, 512)
    ).eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 112, 112),),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}},
        dynamo=False,
    )
    return path


def save_fid_inception(path: Path) -> Path:
    """A random-init FID Inception-v3 saved as pytorch-fid's file is: ``torch.save`` of the torchvision-named state
    dict (1008 classes, no aux head), in torch's legacy (pre-1.6) layout. BN scales sqrt(6) keep random activations
    O(1) through the depth."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    for key, value in state.items():
        if key.endswith("bn.weight"):
            value.fill_(math.sqrt(6))
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


class RandomI3D(nn.Module):
    """I3D's TorchScript call: uint8 ``[B,3,T,H,W]``; ``rescale`` to [-1,1], ``resize`` to 224, 400 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=(4, 16, 16), stride=(4, 16, 16))
        self.fc = nn.Linear(8, 400)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        feats = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return feats if return_features else feats.softmax(-1)


def save_i3d(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(RandomI3D().eval()), str(path))
    return path
