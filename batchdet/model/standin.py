"""A stand-in for MLPerf's ``resnet34-ssd1200.onnx``: same graph, made-up weights.

The official file cannot be downloaded where batchdet is built and tested, so
this module builds, with onnx and numpy only, a model with the official
architecture (ResNet-34 backbone cut after a stride-1 ``layer3``, five extra
blocks, stride-3 heads on six maps) and the official interface (input
``image`` [1, 3, 1200, 1200]; outputs ``bboxes``/``labels``/``scores`` after
in-graph decode, softmax and NonMaxSuppression). Everything downstream
(pre-processing, batching, Ray actors, Parquet writing, timing) therefore
exercises the same shapes, operators and cost as with the real weights; only
the detections are meaningless. See docs/model.md.

Two kinds of weights, both from a seed:

- **random** (the default): He-initialised kernels, as an untrained network.
  Its detections are chaotic: noise far below what a camera adds changes
  most of them, so no comparison of detections means anything with it.
- **smooth** (``smooth=True``): every spatial kernel a blur that mixes
  channels, plus a tenth of a random kernel, so pixel noise averages away
  and colour and shape at the scale of each map drive the detections. They
  are as stable as a trained network's, which makes agreement of
  detections (batchdet against the reference maths, INT8 against FP32) a
  measurement; they are no more meaningful.

``channels_divisor`` narrows every internal channel count for fast tests
while keeping the input size, the 15,130 default boxes, the 81 classes and
the post-processing, i.e. the whole interface.

The default boxes and the post-processing (the interface, not the weights)
are built in batchdet/model/standin_graph.py; their names are importable from here
too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from batchdet.files import atomic_write
from batchdet.model.labels import NUM_CLASSES
from batchdet.model.spec import (
    INPUT_NAME,
    INPUT_SIZE,
    KIND_KEY,
    MEAN,
    SMOOTH,
    STANDIN,
    STANDIN_KEY,
    STD,
    WEIGHTS_KEY,
)
from batchdet.model.standin_graph import (
    BOXES_PER_CELL,
    FEAT_SIZES,
    OPSET,
    Graph,
    build_postprocess,
    check_opset,
    finish_model,
)

# --- channel widths of the official model (divided by channels_divisor) ----
STEM_CHANNELS = 64
#: ResNet-34 layers kept: (output channels, basic blocks, stride of the first block).
LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 1))
#: extra blocks: (1x1 output channels, 3x3 output channels, 3x3 stride, 3x3 padding).
EXTRAS = ((256, 512, 2, 1), (256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 2, 0), (128, 256, 1, 0))
HEAD_KERNEL, HEAD_STRIDE, HEAD_PAD = 3, 3, 1
BN_EPSILON = 1e-5

# --- random weights ----------------------------------------------------------
#: gamma of the BN closing each residual branch. With BN statistics measured
#: (see _Network) every branch is about unit-scale, so the identity path
#: grows by about 1 + RESIDUAL_GAIN² in variance per block: 13 blocks stay
#: within a small factor instead of compounding.
RESIDUAL_GAIN = 0.5
#: scale of the loc head: offsets t of about ±1 on photos, so boxes move and
#: resize visibly (wh = exp(0.2 t)) yet stay near their default box.
LOC_GAIN = 3.0
#: scale of the conf head per map, and the background logit. Random logits
#: give every class ~1/81 < 0.05 and nothing would ever be detected, so the
#: logits are spread and the background offset decides how much spread it
#: takes to pass the 0.05 threshold. The fine maps see far more texture on
#: photos than on smooth images, and the coarse maps' features are weaker,
#: hence gains that rise with depth. Tuned on the full model, seed 0: 200
#: detections (of every size) on a dense photo, 15-110 on smooth random
#: images, 10-30 on blurred flat shapes, a few on a plain gradient, none on
#: a flat image. Other seeds and the narrow model land in the same range,
#: image by image within a factor of a few.
CONF_GAINS = (2.9, 3.9, 4.5, 7.4, 10.7, 14.0)
BACKGROUND_BIAS = 9.0
#: flat colour images the BN statistics are measured on: this many levels per RGB channel.
FLAT_LEVELS = 5

# --- smooth weights ----------------------------------------------------------
#: the share of a random (He) kernel added to each blur kernel: enough that
#: channels also see edges and texture, small enough that noise still
#: averages away (docs/notes/2026-12-04-smooth.md: the stability measured).
SMOOTH_PERTURBATION = 0.1
#: conf head of the smooth stand-in: the gain of its structure kernels (as
#: CONF_GAINS), the spread of its colour term (logits of unit spread over the
#: flat colours, times this) and the background logit per map, raised by
#: SMOOTH_NARROWING per halving of the width: narrower models answer more
#: strongly to texture. Tuned on scikit-image's 20 photographs, seed 0, widths
#: 1, 8 and 16: a few to about a hundred detections at score >= 0.5 per
#: photo, of every size and most classes, below the 200 cap that would make
#: the last ones a matter of rank.
SMOOTH_CONF_GAIN = 10.0
SMOOTH_COLOUR_GAIN = 2.0
SMOOTH_BACKGROUND = (6.5, 6.5, 6.0, 4.5, 3.0, 3.0)
SMOOTH_NARROWING = 0.7
#: loc head of the smooth stand-in: its structure kernels' gain, low so that boxes move by a pixel
#: only for real differences of input (offsets of about ±0.3 on photos; notes: the 1-px agreement)
SMOOTH_LOC_GAIN = 1.0


class _Network(Graph):
    """Adds layers with seeded random weights, named like the PyTorch reference.

    Random BN statistics would normalise nothing: activations of 13 random
    residual blocks drift by an order of magnitude, differently in the full
    and the narrow model. So next to every tensor the builder tracks two
    cheap shadows, without any inference:

    - ``flat``: its exact value on a set of flat colour images (on a flat
      image a conv is a matrix product with its tap-summed kernel);
    - ``texture``: the power it would carry for spatially white input
      texture (a conv maps powers through its squared weights).

    BN running statistics, and the extras' weight scale and bias, come from
    them as training would give them: pre-activations centred on the flat
    colours and scaled by the larger of the two powers. The colours alone
    would not do: a channel nearly blind to colour still answers to texture,
    and dividing by its tiny colour variance blows that answer up (by orders
    of magnitude in the narrowest models).
    """

    def __init__(self, graph: onnx.GraphProto, rng: np.random.Generator) -> None:
        super().__init__(graph)
        self.rng = rng
        levels = np.linspace(0.0, 255.0, FLAT_LEVELS)
        rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
        #: tensor name -> its per-channel value on each flat colour image, [colours, channels]
        self.flat: dict[str, np.ndarray] = {INPUT_NAME: (rgb - MEAN) / STD}
        #: tensor name -> its per-channel power for white texture of unit power at the input, [channels]
        self.texture: dict[str, np.ndarray] = {INPUT_NAME: np.ones(3)}

    def he(self, cout: int, cin: int, kernel: int) -> np.ndarray:
        """He-normal weights, N(0, 2/fan_in): variance-preserving through a ReLU."""
        std = np.float32(math.sqrt(2.0 / (cin * kernel * kernel)))
        return self.rng.standard_normal((cout, cin, kernel, kernel), dtype=np.float32) * std

    def conv(
        self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None, stride: int = 1, pad: int = 0
    ) -> str:
        out = self._emit_conv(x, name, weight, bias, stride, pad)
        self.flat[out], self.texture[out] = self._shadow_conv(x, weight)
        if bias is not None:
            self.flat[out] += bias
        return out

    def _emit_conv(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, stride: int, pad: int) -> str:
        inputs = [x, self.const(name + ".weight", weight.astype(np.float32))]
        if bias is not None:
            inputs.append(self.const(name + ".bias", bias.astype(np.float32)))
        k = weight.shape[-1]
        return self.op("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def _shadow_conv(self, x: str, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both shadows of a bias-free conv of ``x`` (float64: machine-independent once cast to float32)."""
        w = weight.astype(np.float64)
        return self.flat[x] @ w.sum(axis=(2, 3)).T, self.texture[x] @ (w * w).sum(axis=(2, 3)).T

    def _variance(self, flat: np.ndarray, texture: np.ndarray) -> np.ndarray:
        """The variance a pre-activation is normalised by: the larger of its colour variance and texture power."""
        return np.maximum(flat.var(axis=0), texture) + 1e-6

    def bn(self, x: str, name: str, gain: float = 1.0) -> str:
        """Inference BatchNormalization: running statistics from the shadows, random affine around identity."""
        pre = self.flat[x]
        channels = pre.shape[1]
        mean, var = pre.mean(axis=0), self._variance(pre, self.texture[x])
        gamma = gain * self.rng.uniform(0.8, 1.2, channels)
        beta = self.rng.normal(0.0, 0.1, channels)
        params = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
        inputs = [x] + [self.const(f"{name}.{k}", v.astype(np.float32)) for k, v in params.items()]
        out = self.op("BatchNormalization", inputs, name, epsilon=BN_EPSILON)
        # what onnxruntime computes, from the float32 values actually stored
        p = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
        scale = p["weight"] / np.sqrt(p["running_var"] + BN_EPSILON)
        self.flat[out] = scale * (pre - p["running_mean"]) + p["bias"]
        self.texture[out] = scale**2 * self.texture[x]
        return out

    def relu(self, x: str, name: str) -> str:
        out = self.op("Relu", [x], name)
        self.flat[out] = np.maximum(self.flat[x], 0.0)
        self.texture[out] = self.texture[x] / 2  # a ReLU passes half of a zero-mean signal's power
        return out

    def add(self, a: str, b: str, name: str) -> str:
        out = self.op("Add", [a, b], name)
        self.flat[out] = self.flat[a] + self.flat[b]
        self.texture[out] = self.texture[a] + self.texture[b]
        return out

    def maxpool(self, x: str, name: str) -> str:
        out = self.op("MaxPool", [x], name, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        self.flat[out] = self.flat[x]  # the max of a constant is the constant
        self.texture[out] = self.texture[x]
        return out

    def basic_block(self, x: str, name: str, cin: int, cout: int, stride: int) -> str:
        """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN (+ 1x1 conv-BN shortcut when the shape changes)."""
        y = self.conv(x, name + ".conv1", self.he(cout, cin, 3), stride=stride, pad=1)
        y = self.relu(self.bn(y, name + ".bn1"), name + ".relu1")
        y = self.conv(y, name + ".conv2", self.he(cout, cout, 3), pad=1)
        y = self.bn(y, name + ".bn2", gain=RESIDUAL_GAIN)
        if cin != cout:
            # The shape changes at both downsample points (64->128 stride 2, 128->256 stride 1).
            x = self.conv(x, name + ".downsample.0", self.he(cout, cin, 1), stride=stride)
            x = self.bn(x, name + ".downsample.1")
        return self.relu(self.add(y, x, name + ".add"), name + ".relu2")

    def conv_relu(
        self, x: str, name: str, relu_name: str, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0
    ) -> str:
        """Conv+bias+ReLU of the extra blocks, which have no BN: its normalisation is folded into weight and bias."""
        w = self.he(cout, cin, kernel)
        pre, texture = self._shadow_conv(x, w)
        scale = 1.0 / np.sqrt(self._variance(pre, texture))
        w = w * scale[:, None, None, None].astype(np.float32)
        bias = -pre.mean(axis=0) * scale + self.rng.normal(0.0, 0.1, cout)
        return self.relu(self.conv(x, name, w, bias, stride, pad), relu_name)

    def head(self, x: str, name: str, cin: int, cout: int, gain: float, bias: np.ndarray) -> str:
        """A 3x3 stride-3 head conv whose kernels respond to 2-D structure only (:meth:`structure_kernels`)."""
        return self.emit_head(x, name, self.structure_kernels(cout, cin, gain), bias)

    def structure_kernels(self, cout: int, cin: int, gain: float) -> np.ndarray:
        """Random head kernels that answer to 2-D structure only.

        Each kernel is double-centred (every row and every column of taps
        sums to zero per input channel), so flat regions, straight edges and
        the rows/columns the zero padding touches give exactly the bias. A
        plain random kernel would answer mostly to each channel's mean, which
        is the same for every image: the same few classes would win
        everywhere, strongest along the padded border.
        """
        w = self.rng.standard_normal((cout, cin, HEAD_KERNEL, HEAD_KERNEL), dtype=np.float32)
        w = w - w.mean(axis=2, keepdims=True) - w.mean(axis=3, keepdims=True) + w.mean(axis=(2, 3), keepdims=True)
        return w * np.float32(gain / math.sqrt(cin * HEAD_KERNEL * HEAD_KERNEL))

    def emit_head(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """The head conv (3x3, stride 3, pad 1); no shadows: nothing downstream is normalised."""
        return self._emit_conv(x, name, weight, bias, HEAD_STRIDE, HEAD_PAD)

    def heads(self, m: int, x: str, cin: int, nd: int) -> tuple[str, str]:
        """Map ``m``'s loc and conf heads (``nd`` default boxes per cell): offsets of about ±1,
        logits spread by CONF_GAINS[m] around a background offset that decides how much
        spread it takes to pass the 0.05 threshold."""
        loc = self.head(x, f"loc.{m}", cin, 4 * nd, LOC_GAIN, np.zeros(4 * nd))
        conf = self.head(x, f"conf.{m}", cin, NUM_CLASSES * nd, CONF_GAINS[m],
                         np.repeat(_class_bias(BACKGROUND_BIAS), nd))
        return loc, conf


class _SmoothNetwork(_Network):
    """The smooth stand-in's weights: blur kernels that mix channels, and heads that read colour too.

    Every spatial kernel is ``M[o, i] · blur + SMOOTH_PERTURBATION · He``:
    on what varies slowly it is a 1x1 channel mix (a random, He-scaled
    ``M``), and pixel-scale noise is averaged away at every layer instead of
    amplified. 1x1 kernels stay random. BN statistics come from the same
    shadows as the random stand-in's, so activations keep their scale.

    The heads add to the random stand-in's structure kernels a colour
    term: class logits a random projection of the map's local mean
    features, centred and scaled by their values on the flat colours, so
    every class spreads alike and regions of different colour and texture
    favour different classes with wide margins.
    """

    def __init__(self, graph: onnx.GraphProto, rng: np.random.Generator, channels_divisor: int) -> None:
        super().__init__(graph, rng)
        self.halvings = math.log2(channels_divisor)

    def he(self, cout: int, cin: int, kernel: int) -> np.ndarray:
        random = super().he(cout, cin, kernel)
        if kernel == 1:
            return random
        mix = self.rng.standard_normal((cout, cin)) * math.sqrt(2.0 / cin)
        return (mix[:, :, None, None] * _blur(kernel) + SMOOTH_PERTURBATION * random).astype(np.float32)

    def heads(self, m: int, x: str, cin: int, nd: int) -> tuple[str, str]:
        loc = self.emit_head(x, f"loc.{m}", self.structure_kernels(4 * nd, cin, SMOOTH_LOC_GAIN), np.zeros(4 * nd))
        w = self.structure_kernels(NUM_CLASSES * nd, cin, SMOOTH_CONF_GAIN)
        flat = self.flat[x]  # [colours, cin]: the map on each flat colour image
        mean, spread = flat.mean(axis=0), flat.std(axis=0) + 1e-6
        mix = self.rng.standard_normal((NUM_CLASSES * nd, cin)) / spread
        mix *= SMOOTH_COLOUR_GAIN / (((flat - mean) @ mix.T).std(axis=0)[:, None] + 1e-9)  # unit spread per class
        w = w + (mix[:, :, None, None] / (HEAD_KERNEL * HEAD_KERNEL)).astype(np.float32)  # the 3x3 mean
        background = np.repeat(_class_bias(SMOOTH_BACKGROUND[m] + SMOOTH_NARROWING * self.halvings), nd)
        return loc, self.emit_head(x, f"conf.{m}", w, background - mix @ mean)


def build_standin(seed: int = 0, channels_divisor: int = 1, opset: int = OPSET, smooth: bool = False
                  ) -> onnx.ModelProto:
    """The stand-in model: official architecture and interface, weights from ``default_rng(seed)``,
    random or (``smooth``) chosen to be stable (see the module's docstring).

    ``channels_divisor`` = 1 is the full model (≈20.0 M parameters, ≈433
    GFLOPs at 1200²); larger divisors (a power of two up to 64) divide every
    internal channel count for fast tests, keeping the interface intact.
    ``opset`` (10..17, default 10 as the official file's graph) changes how
    the file spells its nodes, not its weights or outputs.
    """
    if channels_divisor < 1 or STEM_CHANNELS % channels_divisor:
        raise ValueError(f"channels_divisor must divide {STEM_CHANNELS}, got {channels_divisor}")
    check_opset(opset)  # before minutes of building, not after
    c = lambda n: n // channels_divisor  # noqa: E731
    graph = helper.make_graph(
        [], "batchdet_standin_ssd_resnet34",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE])], [],
    )
    rng = np.random.default_rng(seed)
    net = _SmoothNetwork(graph, rng, channels_divisor) if smooth else _Network(graph, rng)

    # backbone: ResNet-34 stem, layer1-3 (layer3 all stride 1): 1200 -> 150
    x = net.conv(INPUT_NAME, "backbone.conv1", net.he(c(STEM_CHANNELS), 3, 7), stride=2, pad=3)
    x = net.relu(net.bn(x, "backbone.bn1"), "backbone.relu")
    x = net.maxpool(x, "backbone.maxpool")
    cin = c(STEM_CHANNELS)
    for li, (cout, blocks, stride) in enumerate(LAYERS, start=1):
        for b in range(blocks):
            x = net.basic_block(x, f"backbone.layer{li}.{b}", cin, c(cout), stride if b == 0 else 1)
            cin = c(cout)

    # extra blocks: conv+bias+ReLU, no BN; every block output is a head input
    maps, map_channels = [x], [cin]
    for e, (mid, cout, stride, pad) in enumerate(EXTRAS):
        name = f"additional_blocks.{e}"
        y = net.conv_relu(x, name + ".0", name + ".1", cin, c(mid), 1)
        x = net.conv_relu(y, name + ".2", name + ".3", c(mid), c(cout), 3, stride, pad)
        maps.append(x)
        map_channels.append(c(cout))
        cin = c(cout)

    # heads: [1, k·nd, H, W] -> [1, k, nd·H·W] puts channel k·nd + d at box
    # d·H·W + y·W + x, the default_boxes() order.
    locs, confs = [], []
    for m, (fmap, ch, nd, feat) in enumerate(zip(maps, map_channels, BOXES_PER_CELL, FEAT_SIZES)):
        for kind, per_box, y, out in zip(("loc", "conf"), (4, NUM_CLASSES), net.heads(m, fmap, ch, nd), (locs, confs)):
            shape = net.const(f"{kind}.{m}.shape", np.array([1, per_box, nd * feat * feat], dtype=np.int64))
            out.append(net.op("Reshape", [y, shape], f"{kind}.{m}.flat"))
    loc = net.op("Concat", locs, "loc", axis=2)
    conf = net.op("Concat", confs, "conf", axis=2)
    build_postprocess(graph, loc, conf, opset)
    return finish_model(graph, standin_metadata(seed, channels_divisor, smooth), opset)


def standin_metadata(seed: int, channels_divisor: int, smooth: bool = False) -> dict[str, str]:
    """What a stand-in says about itself (``batchdet model info`` prints it):
    its kind, its weights if smooth, and the seed and divisor that rebuild it byte for
    byte. ``batchdet.standin`` is the flag older versions recognise stand-ins by."""
    weights = {WEIGHTS_KEY: SMOOTH} if smooth else {}  # none: random, as every stand-in before smooth ones
    return {KIND_KEY: STANDIN, STANDIN_KEY: "true", **weights, "batchdet.seed": str(seed),
            "batchdet.channels_divisor": str(channels_divisor)}


def _class_bias(background: float) -> np.ndarray:
    """Per-class conf bias: only background is offset, so no class is favoured everywhere."""
    bias = np.zeros(NUM_CLASSES)
    bias[0] = background
    return bias


def _blur(kernel: int) -> np.ndarray:
    """A separable low-pass kernel whose taps sum to 1: binomial for 3x3, a
    Gaussian of sigma 1.5 for the stem's 7x7 (it anti-aliases the stride 2)."""
    if kernel == 7:
        taps = np.exp(-0.5 * ((np.arange(7) - 3) / 1.5) ** 2)
    else:
        taps = np.array([math.comb(kernel - 1, i) for i in range(kernel)], dtype=np.float64)
    taps /= taps.sum()
    return np.outer(taps, taps)


def write_standin(path: str | os.PathLike, seed: int = 0, channels_divisor: int = 1, opset: int = OPSET,
                  smooth: bool = False) -> Path:
    """Build the stand-in and write it to ``path`` atomically; returns the path.

    Several workers may race to create the same file: each writes a temp file
    in the target directory and renames it over ``path``, so a reader never
    sees a half-written model.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = build_standin(seed, channels_divisor, opset, smooth).SerializeToString()
    with atomic_write(target, mode=0o644) as f:  # readable by other users, whatever the umask
        f.write(data)
    return target
