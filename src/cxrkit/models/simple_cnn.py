"""A small CNN trained from scratch: the baseline the Kaggle notebooks start from."""

from __future__ import annotations

from torch import nn


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SimpleCNN(nn.Module):
    """Five conv blocks (32..256 channels) and global average pooling; ~1.9M parameters.

    Plain full-width convolutions are costly at full resolution: the model's own input size
    is 128 px, where a training step costs less than EfficientNet-Lite0's at 224 on a CPU.
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 192, 256)):
        super().__init__()
        chans = (in_chans, *widths)
        pairs = zip(chans, chans[1:], strict=False)
        self.blocks = nn.Sequential(*[_conv_block(a, b) for a, b in pairs])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]

    def forward(self, x):
        return self.pool(self.blocks(x)).flatten(1)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [list(block.parameters()) for block in self.blocks]

    def gradcam_layer(self) -> nn.Module:
        return self.blocks[-1]
