"""The reference for tests/test_c3d_inception_score.py: TGANv2's C3D and ``calc_is.py`` preprocessing, in chainer.

Run as a separate process (``python tests/chainer_c3d_reference.py FOLDER``) because chainer 7.8.1, the last
release, predates numpy 2 and setuptools 80: it needs ``np.sctypes``, ``pkg_resources`` and ``numpy.distutils``,
which are put in place here as the few names it reads, not in the test process.

FOLDER holds ``videos.npy`` (N, 16, H, W, 3) uint8. This writes there, as TGANv2 would have them:
- ``c3d.npz``: random weights of ``C3DVersion1`` saved by ``chainer.serializers.save_npz`` (the released file's
  format, keys ``conv1a/W`` ...);
- ``mean2.npz``: a random mean clip ``{"mean": (1, 3, 16, 128, 171)}``;
- ``probabilities.npy`` (N, 101): ``calc_is.py``'s pipeline (cv2 INTER_CUBIC to 128 x 128 on float frames, BGR,
  minus the mean's centre 128 columns, centre crop 112) then the network up to ``prob``, with
  ``chainer.config.train = False`` (dropout off; see jaxvc/eval/inception_score.py on TGANv2's ``and``);
- ``score.npy``: ``calc_inception`` of the probabilities.
"""
import sys
import types
import warnings

import numpy as np

warnings.simplefilter("ignore")
np.sctypes = {"int": [np.int8, np.int16, np.int32, np.int64], "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
              "float": [np.float16, np.float32, np.float64], "complex": [np.complex64, np.complex128],
              "others": [bool, object, bytes, str, np.void]}
pkg_resources = types.ModuleType("pkg_resources")
pkg_resources.DistributionNotFound = type("DistributionNotFound", (Exception,), {})
pkg_resources.VersionConflict = type("VersionConflict", (Exception,), {})


def _require(*_):  # chainer's optional-dependency check: report every optional package as absent
    raise pkg_resources.DistributionNotFound()


pkg_resources.require = _require
system_info = types.ModuleType("numpy.distutils.system_info")
system_info.get_info = lambda *_: {}
distutils = types.ModuleType("numpy.distutils")
distutils.system_info = system_info
sys.modules.update({"pkg_resources": pkg_resources, "numpy.distutils": distutils,
                    "numpy.distutils.system_info": system_info})

import chainer  # noqa: E402
import cv2  # noqa: E402
from chainer.functions import dropout, relu, softmax  # noqa: E402
from chainer.functions.pooling.max_pooling_nd import max_pooling_nd  # noqa: E402
from chainer.links.connection.convolution_nd import ConvolutionND  # noqa: E402
from chainer.links.connection.linear import Linear  # noqa: E402
from chainer.serializers import save_npz  # noqa: E402

CONVS = (("conv1a", 3, 64), ("conv2a", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256), ("conv4a", 256, 512),
         ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512))


class C3DVersion1(chainer.Chain):
    """TGANv2's tgan2/models/c3d/c3d_ucf101.py network and layer order (without its download logic)."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            for name, cin, cout in CONVS:
                setattr(self, name, ConvolutionND(3, cin, cout, 3, 1, 1))
            self.fc6 = Linear(512 * 4 * 4, 4096)
            self.fc7 = Linear(4096, 4096)
            self.fc8 = Linear(4096, 101)

    def __call__(self, x):
        pool2d = lambda h: max_pooling_nd(h, ksize=(1, 2, 2))  # noqa: E731
        pool3d = lambda h: max_pooling_nd(h, ksize=2)  # noqa: E731
        h = pool2d(relu(self.conv1a(x)))
        h = pool3d(relu(self.conv2a(h)))
        h = pool3d(relu(self.conv3b(relu(self.conv3a(h)))))
        h = pool3d(relu(self.conv4b(relu(self.conv4a(h)))))
        h = pool3d(relu(self.conv5b(relu(self.conv5a(h)))))
        h = dropout(relu(self.fc6(h)))
        h = dropout(relu(self.fc7(h)))
        return softmax(self.fc8(h))


def randomize(model, rng):
    """He-scaled weights, small biases; the first layer scaled for inputs of about +-100, fc8 for logits of a few
    units, so that the probabilities are neither uniform nor one-hot."""
    for name, link in model.namedlinks(skipself=True):
        fan_in = int(np.prod(link.W.shape[1:]))
        scale = np.sqrt(2.0 / fan_in) * {"/conv1a": 0.02, "/fc8": 1.0}.get(name, 1.0)
        link.W.array[...] = rng.normal(0, scale, link.W.shape).astype(np.float32)
        link.b.array[...] = rng.normal(0, 0.05, link.b.shape).astype(np.float32)


def calc_inception(ys):
    """TGANv2's calc_is.calc_inception."""
    n = ys.shape[0]
    p_all = np.mean(ys, axis=0, keepdims=True)
    kl = np.sum(ys * np.log(ys + 1e-7) - ys * np.log(p_all + 1e-7)) / n
    return np.exp(kl)


def main(folder):
    rng = np.random.default_rng(7)
    videos = np.load(f"{folder}/videos.npy")  # (b, t, h, w, c) uint8, RGB
    model = C3DVersion1()
    randomize(model, rng)
    save_npz(f"{folder}/c3d.npz", model)
    mean_file = (100 + 20 * rng.standard_normal((1, 3, 16, 128, 171))).astype(np.float32)
    np.savez(f"{folder}/mean2.npz", mean=mean_file)
    mean = mean_file.reshape((3, 1, 16, 128, 171))[:, :, :, :, 21:21 + 128]

    n, f, h, w, c = videos.shape
    x = videos.astype(np.float32).reshape(n * f, h, w, c)  # calc_is.py's loader hands over float frames
    x_ = np.zeros((n * f, 128, 128, 3))
    for t in range(n * f):
        x_[t] = np.asarray(cv2.resize(x[t], (128, 128), interpolation=cv2.INTER_CUBIC))
    x = x_.transpose(3, 0, 1, 2).reshape(3, n, f, 128, 128)
    x = x[::-1] - mean  # BGR
    x = x[:, :, :, 8:8 + 112, 8:8 + 112].astype("f")
    x = x.transpose(1, 0, 2, 3, 4)  # (b, c, t, h, w)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        ys = np.concatenate([model(x[i:i + 2]).array for i in range(0, n, 2)])
    np.save(f"{folder}/probabilities.npy", ys)
    np.save(f"{folder}/score.npy", np.asarray(calc_inception(ys)))


if __name__ == "__main__":
    main(sys.argv[1])
