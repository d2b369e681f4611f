"""Pooling layers: ``MaxPool2d``, ``AvgPool2d`` (PyTorch's semantics, floor output size) and
``GlobalAvgPool2d`` ((C, H, W) -> (C,), torch's AdaptiveAvgPool2d(1) followed by a flatten)."""

import numpy as np

from gpubackprop.layers.base import Layer, fmt_shape, int_pair, no_backprop, pair_repr
from gpubackprop.layers.conv import _geometry
from gpubackprop.layers.registry import REQUIRED, SpecToken, plain, register


def _contiguous(xp, a):
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


class _Pool2d(Layer):
    """What the two window poolings share: arguments, shapes and the workspace."""

    dilation = (1, 1)

    def _window_args(self, kernel_size, stride, padding):
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else int_pair(stride, "stride")
        self.padding = int_pair(padding, "padding", minimum=0)
        kh, kw = self.kernel_size
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2:
            raise ValueError(f"padding: expected at most half the kernel size "
                             f"{pair_repr(self.kernel_size)} (as PyTorch), got "
                             f"{pair_repr(self.padding)}")
        self._workspaces = {}

    def _args_repr(self):
        args = [pair_repr(self.kernel_size)]
        if self.stride != self.kernel_size:
            args.append(f"stride={pair_repr(self.stride)}")
        if self.padding != (0, 0):
            args.append(f"padding={pair_repr(self.padding)}")
        return args

    def infer_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"expected a per-sample input of shape (C, H, W), got shape "
                             f"{fmt_shape(input_shape)}")
        return (input_shape[0], *_geometry(self, input_shape))


class MaxPool2d(_Pool2d):
    """The maximum of each kh x kw window (stride defaults to the kernel size), as torch's."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        self._window_args(kernel_size, stride, padding)
        self.dilation = int_pair(dilation, "dilation")

    def __repr__(self):
        args = self._args_repr()
        if self.dilation != (1, 1):
            args.append(f"dilation={pair_repr(self.dilation)}")
        return f"MaxPool2d({', '.join(args)})"

    def config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation)}

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        shape = (X.shape[0], *self.output_shape)
        win = (self.kernel_size, self.stride, self.padding, self.dilation)
        if not train:
            Y = be.empty(shape)
            be.ops.max_pool2d(X, Y, be.empty(shape, np.int64), *win)
            return Y, no_backprop
        Y, argmax, dX = self.workspace(X.shape[0], lambda: (
            be.empty(shape), be.empty(shape, np.int64), be.empty(X.shape)))
        be.ops.max_pool2d(X, Y, argmax, *win)

        def backprop(dY):
            if not input_grad:
                return None
            # Each pixel gathers the gradients of the outputs whose maximum it was.
            return be.ops.max_pool2d_backward(_contiguous(be.xp, dY), argmax, dX, *win)

        return Y, backprop


class AvgPool2d(_Pool2d):
    """The mean of each kh x kw window (padding counts as zeros when ``count_include_pad``)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        self._window_args(kernel_size, stride, padding)
        if not isinstance(count_include_pad, (bool, np.bool_)):
            raise TypeError(f"count_include_pad: expected True or False, got {count_include_pad!r}")
        self.count_include_pad = bool(count_include_pad)

    def __repr__(self):
        args = self._args_repr()
        if not self.count_include_pad:
            args.append("count_include_pad=False")
        return f"AvgPool2d({', '.join(args)})"

    def config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "count_include_pad": self.count_include_pad}

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        shape = (X.shape[0], *self.output_shape)
        win = (self.kernel_size, self.stride, self.padding, self.count_include_pad)
        if not train:
            Y = be.empty(shape)
            be.ops.avg_pool2d(X, Y, *win)
            return Y, no_backprop
        Y, dX = self.workspace(X.shape[0], lambda: (be.empty(shape), be.empty(X.shape)))
        be.ops.avg_pool2d(X, Y, *win)

        def backprop(dY):
            if not input_grad:
                return None
            return be.ops.avg_pool2d_backward(_contiguous(be.xp, dY), dX, *win)

        return Y, backprop


class GlobalAvgPool2d(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel's plane."""

    def __repr__(self):
        return "GlobalAvgPool2d()"

    def infer_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"expected a per-sample input of shape (C, H, W), got shape "
                             f"{fmt_shape(input_shape)}")
        return (input_shape[0],)

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        xp = be.xp
        N, (C, H, W) = X.shape[0], self.input_shape
        planes = X.reshape(N, C, H * W)
        if not train:
            return xp.mean(planes, axis=2), no_backprop
        Y, dX = self.workspace(N, lambda: (be.empty((N, C)), be.empty(X.shape)))
        xp.mean(planes, axis=2, out=Y)

        def backprop(dY):
            if not input_grad:
                return None
            # Every pixel of a plane gets its channel's gradient over the plane's size.
            xp.divide(dY.reshape(N, C, 1, 1), H * W, out=dX)
            return dX

        return Y, backprop


# ---- registry declarations ------------------------------------------------------------------
def _make_pool(kind, extra):
    def make(ctx):
        p = ctx.params
        k = plain(p["k"])
        kw = {"kernel_size": k, "stride": k if p["stride"] is None else plain(p["stride"]),
              "padding": plain(p["pad"])}
        return [(kind, {**kw, **{name: plain(p[key]) if key == "dil" else p[key]
                                 for key, name in extra.items()}})]
    return make


_WINDOW = {"k": ("pair", REQUIRED), "stride": ("pair", None), "pad": ("pair0", 0)}
register(MaxPool2d, SpecToken("maxpool", _make_pool("MaxPool2d", {"dil": "dilation"}),
                              {**_WINDOW, "dil": ("pair", 1)}, positional=("k",), needs="image",
                              example="maxpool(2)",
                              help="maxpool(k,stride=k,pad=0,dil=1)   max pooling"))
register(AvgPool2d, SpecToken("avgpool", _make_pool("AvgPool2d",
                                                    {"count_include_pad": "count_include_pad"}),
                              {**_WINDOW, "count_include_pad": ("bool", True)}, positional=("k",),
                              needs="image", example="avgpool(2)",
                              help="avgpool(k,stride=k,pad=0,count_include_pad=true)   average pooling"))
register(GlobalAvgPool2d, SpecToken("gap", lambda ctx: [("GlobalAvgPool2d", {})], needs="image",
                                    help="gap           global average pool: (C, H, W) -> (C,)"))
