"""``Dropout``: inverted dropout, its mask a function of (model seed, layer index, training step).

In training mode each element is kept with probability 1 − p and scaled by 1/(1 − p), so the
expected output is the input; in inference mode the layer is the identity. The mask is never
stored: the backend's ops hash (seed, layer, step, element index) into it, in the forward pass and
again in backprop, bit-identically on the CPU and the GPU. ``step`` is the model's count of
training passes (model state, saved in checkpoints), so a resumed run draws the same masks.
"""

from gpubackprop.layers.base import Layer, no_backprop
from gpubackprop.layers.registry import SpecToken, register
from gpubackprop.validation import drop_probability


class _DropoutWorkspace:
    __slots__ = ("Y", "dX")

    def __init__(self, be, shape):
        self.Y = be.empty(shape)
        self.dX = be.empty(shape)


class Dropout(Layer):
    """Zeroes each element with probability ``p`` in training (scaling the rest by 1/(1 − p)), as
    torch.nn.Dropout; the identity in inference. 0 <= p < 1."""

    def __init__(self, p=0.5):
        self.p = drop_probability(p, "p")
        self._workspaces = {}

    def __repr__(self):
        return f"Dropout(p={self.p!r})"

    def config(self):
        return {"p": self.p}

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        if not train:
            return X, no_backprop
        be = self.backend
        ops, p = be.ops, self.p
        # The mask of this pass: fixed now, so backprop recomputes the same one.
        seed, layer, step = self.context.seed, self.index, self.context.step
        ws = self.workspace(X.shape[0], lambda: _DropoutWorkspace(be, X.shape))
        sv = self.context.step_values  # a CUDA graph's step: the step read on the device
        if sv is None:
            ops.dropout(X, ws.Y, p, seed, layer, step)
        else:
            ops.dropout_values(X, ws.Y, p, seed, layer, sv.values)

        def backprop(dY):
            if not input_grad:
                return None
            if not dY.flags.c_contiguous:
                dY = be.xp.ascontiguousarray(dY)
            if sv is None:
                return ops.dropout_backward(dY, ws.dX, p, seed, layer, step)
            return ops.dropout_backward_values(dY, ws.dX, p, seed, layer, sv.values)

        return ws.Y, backprop


register(Dropout, SpecToken("dropout", lambda ctx: [("Dropout", {"p": ctx.params["p"]})],
                            {"p": ("prob", 0.5)}, positional=("p",),
                            help="dropout(p=0.5)   inverted dropout"))
