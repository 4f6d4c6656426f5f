"""The paper's models, built from nn modules. Input: NHWC float32 (N, 32, 32, 3).

`quantize=False` builds the float32 baseline of the same architecture (plain Conv2d/Linear).
BatchNorm layers are followed by ReLU in both models; they are fused (`relu=True`) so the
pair costs one pass over the activations instead of two. In VGG4bit the BN-ReLU that ends a block
and the max pool after it run as one op too (nn.Sequential fuses the pair into
ops.batch_norm_relu_pool), which never stores the full-size activation.
"""
from . import nn, ops
from .errors import NanoQ4Error


def _conv(cin, cout, quantize, bits, per_channel, stride=1):
    if quantize:
        return nn.QConv2d(cin, cout, 3, stride=stride, padding=1, bits=bits, per_channel=per_channel)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _linear(fin, fout, quantize, bits, per_channel):
    if quantize:
        return nn.QLinear(fin, fout, bits=bits, per_channel=per_channel)
    return nn.Linear(fin, fout)


def vgg4bit(num_classes=10, quantize=True, bits=4, per_channel=False, dropout=0.5):
    """The paper's VGG4bit: three [conv-BN-ReLU x2, maxpool] blocks (64, 128, 256 channels),
    then 4096 -> 512 (BN1d, ReLU, dropout) -> classes. 3,251,018 parameters for 10 classes.
    The paper's dropout is 0.5; short runs underfit with it, so the trainer chooses (no
    effect on inference or on the parameter count)."""
    q = dict(quantize=quantize, bits=bits, per_channel=per_channel)
    layers = []
    cin = 3
    for cout in (64, 128, 256):
        layers += [_conv(cin, cout, **q), nn.BatchNorm2d(cout, relu=True),
                   _conv(cout, cout, **q), nn.BatchNorm2d(cout, relu=True),
                   nn.MaxPool2d(2)]  # runs fused with the BN-ReLU before it (nn.Sequential)
        cin = cout
    layers += [nn.Flatten(),
               _linear(4 * 4 * 256, 512, **q), nn.BatchNorm1d(512, relu=True), nn.Dropout(dropout),
               _linear(512, num_classes, **q)]
    return nn.Sequential(*layers)


class ResidualConvBlock(nn.Module):
    """relu(BN(conv(x)) + x): a same-shape conv block with an identity shortcut."""

    def __init__(self, channels, quantize, bits, per_channel):
        self.conv = _conv(channels, channels, quantize, bits, per_channel)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return ops.relu(self.bn(self.conv(x)) + x)


def simple_resnet4bit(num_classes=10, quantize=True, bits=4, per_channel=False, dropout=None):
    """The paper code's small residual network (73,178 parameters for 10 classes):
    16 channels (one residual block), 32 and 64 channels after stride-2 convs, global
    average pool, then a quantized linear classifier. It has no dropout (`dropout` is ignored)."""
    q = dict(quantize=quantize, bits=bits, per_channel=per_channel)
    return nn.Sequential(
        _conv(3, 16, **q), nn.BatchNorm2d(16, relu=True),
        ResidualConvBlock(16, **q),
        _conv(16, 32, stride=2, **q), nn.BatchNorm2d(32, relu=True),
        _conv(32, 32, **q), nn.BatchNorm2d(32, relu=True),
        _conv(32, 64, stride=2, **q), nn.BatchNorm2d(64, relu=True),
        _conv(64, 64, **q), nn.BatchNorm2d(64, relu=True),
        nn.GlobalAvgPool(),
        _linear(64, num_classes, **q),
    )


MODELS = {"vgg4bit": vgg4bit, "simpleresnet4bit": simple_resnet4bit}


def build_model(name, num_classes=10, quantize=True, bits=4, per_channel=False, dropout=None):
    """Build a model by name; the exported model file stores these arguments (not dropout,
    which only acts in training). dropout None: the model's own default."""
    if name not in MODELS:
        raise NanoQ4Error(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    extra = {} if dropout is None else {"dropout": dropout}
    return MODELS[name](num_classes=num_classes, quantize=quantize, bits=bits, per_channel=per_channel, **extra)


def quantized_layers(model):
    """(name, layer) for every QConv2d/QLinear, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.QuantizedWeight)]
