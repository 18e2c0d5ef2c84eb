"""The architecture registry: Keras 3 classifiers of normalised stamps, looked up by name.

Every builder takes the stamp shape ``(H, W)`` and the number of classes and returns an
uncompiled ``keras.Model`` mapping normalised stamps ``(N, H, W, 1)`` float32 to softmax
class probabilities ``(N, n_classes)``; column 1 is P(source at the centre).

The four architectures of the reference notebook:

* ``simple``: Dense(30, relu) -> Dense(30, relu) -> Flatten -> Dense(2, softmax). As in the
  notebook the two hidden Dense layers act on each pixel row's last axis (the single
  channel), i.e. per pixel, before Flatten mixes the pixels: a deliberately weak baseline.
* ``simple_bn``: ``simple`` with the BatchNormalization layers the notebook describes but
  forgot to insert (one after each hidden Dense layer).
* ``vgg6``: two 3x3 conv pairs (16 then 32 filters, 'valid' padding) with max pooling and
  BatchNormalization, then Dense(256) -> Dense(2): the notebook's workhorse, with three
  changes measured in BENCHMARKS.md (input in noise units; a 2x2 last pooling that keeps
  where a feature sits; no dropout), see :func:`vgg6`.
* ``resnet50``: the bottleneck ResNet-50 (stages of 3, 4, 6, 3 blocks; 64-64-256 up to
  512-512-2048 filters), adapted to 21x21 stamps; see :func:`resnet50`.

``simple``, ``simple_bn`` and ``resnet50`` begin with a ``Rescaling(H*W)`` layer
("unit_mean"): the reference normalisation scales each stamp to unit sum, so pixels are
~1/441 and plain SGD on such inputs barely moves (on 50,000 simulated stamps the notebook's
vgg6 stayed at chance for 7 epochs); multiplied by the number of pixels the mean pixel is
1, and the same vgg6 reached ROC AUC 0.99 within 10 epochs. ``vgg6`` goes further and
re-expresses each stamp in noise units (:func:`_noise_units_input`). All models still take the normalised stamps of
:func:`stampbatch.train.preprocess.normalize`; only standard Keras layers and ops, so saved
models load with ``safe_mode=True`` (without importing stampbatch) and export to ONNX.

A new architecture is one builder function plus one entry in :data:`ARCHITECTURES`.
:func:`describe` counts parameters and multiply-adds (MACs) per stamp from the layer shapes
(Conv and Dense layers; pooling, BatchNormalization and additions are negligible).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stampbatch.errors import UsageError

Builder = Callable[..., Any]


def _keras():
    import keras

    return keras


def _input(stamp_shape: Sequence[int]):
    """The stamp input and its rescaling to unit mean pixel: (input tensor, scaled tensor)."""
    keras = _keras()
    h, w = int(stamp_shape[0]), int(stamp_shape[1])
    inputs = keras.Input(shape=(h, w, 1), name="stamp")
    return inputs, keras.layers.Rescaling(float(h * w), name="unit_mean")(inputs)


def _noise_units_input(stamp_shape: Sequence[int]):
    """The stamp input re-expressed in noise units and compressed: (input tensor, scaled tensor).

    The reference normalisation divides each stamp by its sum, so a bright star anywhere in
    the stamp shrinks a faint source at the centre towards zero. Here each stamp is
    re-standardised per stamp to z = (x - median) / sigma_G, sigma_G = 0.7413 IQR (the
    same robust estimator the normalisation uses; in a normalised stamp median - min is
    exactly 2 sigma_G whenever the floor clips a pixel), then compressed with asinh(z):
    linear within the noise, logarithmic above it, so a SNR-5 source at the centre has the
    same input next to a saturated star as on an empty sky. Built from Keras ops only
    (``Reshape`` layers, ``ops.quantile``/``ops.arcsinh`` nodes), so the saved model loads
    with plain ``keras.models.load_model`` in ``safe_mode`` and exports to ONNX.
    """
    keras = _keras()
    ops, layers = keras.ops, keras.layers
    h, w = int(stamp_shape[0]), int(stamp_shape[1])
    inputs = keras.Input(shape=(h, w, 1), name="stamp")
    flat = layers.Reshape((h * w,), name="pixels")(inputs)
    q25, q50, q75 = ops.unstack(ops.quantile(flat, [0.25, 0.5, 0.75], axis=-1, keepdims=True))
    # A flat stamp (IQR 0; the normalisation's fill for unusable rows) maps to all zeros.
    sigma = ops.maximum(ops.multiply(ops.subtract(q75, q25), SIGMA_G_COEFF), NOISE_FLOOR)
    z = ops.arcsinh(ops.divide(ops.subtract(flat, q50), sigma))
    return inputs, layers.Reshape((h, w, 1), name="noise_units")(z)


# preprocess.SIGMA_G_COEFF (kept local: models must not depend on preprocess at load time,
# the constant is baked into the saved graph). NOISE_FLOOR guards sigma_G = 0 (flat stamps);
# a normalised pixel is ~1/441, so 1e-9 is far below any real noise level.
SIGMA_G_COEFF = 0.7413
NOISE_FLOOR = 1e-9


def _softmax_head(x, n_classes: int, name: str = "fc_out"):
    return _keras().layers.Dense(n_classes, activation="softmax", name=name)(x)


def simple(stamp_shape: Sequence[int] = (21, 21), n_classes: int = 2):
    """Two hidden Dense(30, relu) layers applied per pixel, Flatten, softmax output."""
    keras = _keras()
    layers = keras.layers
    inputs, x = _input(stamp_shape)
    x = layers.Dense(30, activation="relu", name="fc_1")(x)
    x = layers.Dense(30, activation="relu", name="fc_2")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, _softmax_head(x, n_classes), name="simple")


def simple_bn(stamp_shape: Sequence[int] = (21, 21), n_classes: int = 2):
    """``simple`` with BatchNormalization after each hidden Dense layer (the notebook's intent)."""
    keras = _keras()
    layers = keras.layers
    inputs, x = _input(stamp_shape)
    x = layers.Dense(30, activation="relu", name="fc_1")(x)
    x = layers.BatchNormalization(axis=-1, name="bn_1")(x)
    x = layers.Dense(30, activation="relu", name="fc_2")(x)
    x = layers.BatchNormalization(axis=-1, name="bn_2")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, _softmax_head(x, n_classes), name="simple_bn")


def vgg6(stamp_shape: Sequence[int] = (21, 21), n_classes: int = 2):
    """The notebook's VGG-like network ('valid' padding; needs stamps of at least 20x20).

    noise units -> conv 19 -> conv 17 -> pool 8 -> conv 6 -> conv 4 -> pool 2 -> Dense(256) -> 2.

    Three departures from the notebook, the first two for what the label means (a source
    *at the centre*, whatever else the field holds):

    * the input is re-expressed in noise units (:func:`_noise_units_input`) instead of
      being multiplied by H*W, so a bright star elsewhere does not shrink the centre;
    * the last pooling is 2x2 over the 4x4 map, not 4x4: a 4x4 max pool keeps only the
      strongest response *anywhere*, making the head blind to whether a source sits at
      the centre or 4 px off it (one of the hard negatives, and every blend). The 2x2 map
      keeps the quadrant; it costs 2 % more multiply-adds (1.06 M per stamp);
    * no dropout (the notebook drops 25 % after each pooling and 50 % after Dense(256)):
      with random flips and quarter-turns, 30,000 stamps and 15 epochs it only held the
      network back (training loss equal to validation loss, 0.175 against 0.176); without
      it the validation loss falls to 0.158 (seed 0) and the shifted sky's ROC AUC rises
      by 0.004, every training seed alike (BENCHMARKS.md, tenth session).
    """
    keras = _keras()
    layers = keras.layers
    inputs, x = _noise_units_input(stamp_shape)
    x = layers.Conv2D(16, 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv3")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv4")(x)
    x = layers.BatchNormalization(axis=-1, name="bn_2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc_1")(x)
    return keras.Model(inputs, _softmax_head(x, n_classes), name="vgg6")


def _bottleneck(x, filters: tuple[int, int, int], stride: int, project: bool, name: str):
    """ResNet v1 bottleneck: 1x1 -> 3x3 -> 1x1 with BatchNorm, shortcut added before the ReLU.

    The stride sits on the 3x3 convolution (as in "ResNet v1.5"), so a stride-2 block
    looks at every pixel instead of skipping three quarters of them in a 1x1 convolution.
    """
    layers = _keras().layers
    f1, f2, f3 = filters
    shortcut = x
    y = layers.Conv2D(f1, 1, padding="same", name=f"{name}_2a")(x)
    y = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name=f"{name}_bn2a")(y)
    y = layers.Activation("relu", name=f"{name}_relu2a")(y)
    y = layers.Conv2D(f2, 3, strides=stride, padding="same", name=f"{name}_2b")(y)
    y = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name=f"{name}_bn2b")(y)
    y = layers.Activation("relu", name=f"{name}_relu2b")(y)
    y = layers.Conv2D(f3, 1, padding="same", name=f"{name}_2c")(y)
    y = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name=f"{name}_bn2c")(y)
    if project:
        shortcut = layers.Conv2D(f3, 1, strides=stride, padding="same", name=f"{name}_1")(x)
        shortcut = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name=f"{name}_bn1")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


# BatchNorm's moving statistics are what a trained ResNet is evaluated with. Keras's
# default momentum (0.99) needs several hundred steps to forget its initial mean 0 /
# variance 1; with the few hundred steps of a stamp-sized training set the validation loss
# then stays at 1e2-1e4 while the training loss is low. 0.9 settles within an epoch.
RESNET_BN_MOMENTUM = 0.9

# (filters of the bottleneck, number of blocks, stride of the first block) per stage.
RESNET50_STAGES: tuple[tuple[tuple[int, int, int], int, int], ...] = (
    ((64, 64, 256), 3, 1),
    ((128, 128, 512), 4, 2),
    ((256, 256, 1024), 6, 2),
    ((512, 512, 2048), 3, 2),
)


def resnet50(stamp_shape: Sequence[int] = (21, 21), n_classes: int = 2):
    """Bottleneck ResNet-50 (stages of 3-4-6-3 blocks) adapted to 21x21 stamps.

    Changes from the reference (ImageNet-style) network and why:

    * stem: a 3x3 stride-1 convolution at full resolution, then a 3x3 stride-2 convolution
      and a 3x3 stride-2 max pool (21 -> 11 -> 6), instead of the reference's 7x7 stride-2
      convolution on a zero-padded stamp. The first features see the point source at full
      resolution (a PSF FWHM of 2 px is not smeared by a 7x7/2 kernel before any
      non-linearity), and the 6x6 map after the stem keeps the source in the central cell;
    * 'same' padding throughout and the stride on the 3x3 convolution of each first block
      ("ResNet v1.5"), so the stages go 6 -> 3 -> 2 -> 1 without the reference's stride-2
      1x1 convolutions that skip three pixels in four;
    * global average pooling before the softmax layer, so the head does not depend on the
      stamp size.

    Cost: ~70 M multiply-adds per stamp, like the reference's adaptation (~60 M) and a
    third of running stage 2 at 11x11 (~200 M): on a 2-core CPU that is the difference
    between scoring a survey chunk in minutes and in an hour. The width and depth of
    ResNet-50 (23.6 M parameters) are unchanged.
    """
    keras = _keras()
    layers = keras.layers
    inputs, x = _input(stamp_shape)
    x = layers.Conv2D(64, 3, padding="same", name="stem_conv")(x)
    x = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.Conv2D(64, 3, strides=2, padding="same", name="stem_conv2")(x)
    x = layers.BatchNormalization(axis=-1, momentum=RESNET_BN_MOMENTUM, name="stem_bn2")(x)
    x = layers.Activation("relu", name="stem_relu2")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (filters, blocks, stride) in enumerate(RESNET50_STAGES, start=2):
        for block in range(blocks):
            x = _bottleneck(x, filters, stride if block == 0 else 1, project=block == 0,
                            name=f"res{stage}{chr(ord('a') + block)}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, _softmax_head(x, n_classes), name="resnet50")


ARCHITECTURES: dict[str, Builder] = {
    "simple": simple,
    "simple_bn": simple_bn,
    "vgg6": vgg6,
    "resnet50": resnet50,
}


def architecture_names() -> list[str]:
    """The registered architecture names, in registry order."""
    return list(ARCHITECTURES)


def check_architecture(name: str) -> None:
    """Raise UsageError listing the known names when ``name`` is not registered."""
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown architecture '{name}'; known architectures: "
                         f"{', '.join(architecture_names())}")


def build_model(name: str, stamp_shape: Sequence[int] = (21, 21), n_classes: int = 2):
    """Build (uncompiled) the architecture ``name`` for stamps of ``stamp_shape``."""
    check_architecture(name)
    if int(n_classes) < 2:
        raise UsageError(f"n_classes must be at least 2 (softmax output), got {n_classes}")
    if len(stamp_shape) != 2 or min(int(s) for s in stamp_shape) < 1:
        raise UsageError(f"stamp shape must be (height, width), got {tuple(stamp_shape)}")
    try:
        return ARCHITECTURES[name](tuple(int(s) for s in stamp_shape), int(n_classes))
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"architecture '{name}' cannot take {stamp_shape[0]}x{stamp_shape[1]} "
                         f"stamps ({first})") from exc


def count_macs(model) -> int:
    """Multiply-adds per stamp of a built model's Conv and Dense layers, from layer shapes.

    A convolution costs (output pixels) x (kernel size); a Dense layer applied to an
    (..., n_in) tensor costs (number of leading positions) x n_in x n_out.
    """
    keras = _keras()
    layers = keras.layers
    total = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
            out_positions = _prod(layer.output.shape[1:-1])
            total += out_positions * _prod(layer.kernel.shape)
        elif isinstance(layer, layers.Dense):
            positions = _prod(layer.output.shape[1:-1])
            total += positions * _prod(layer.kernel.shape)
    return int(total)


def _prod(values: Sequence[Any]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def describe(name: str, stamp_shape: Sequence[int] = (21, 21)) -> dict[str, Any]:
    """``{"name", "parameters", "macs_per_stamp"}`` of an architecture (builds it once)."""
    model = build_model(name, stamp_shape)
    return {"name": name, "parameters": int(model.count_params()),
            "macs_per_stamp": count_macs(model)}
