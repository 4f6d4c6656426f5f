"""Tensor and Function: the whole reverse-mode autodiff engine.

A Tensor wraps a NumPy array (float32 for training, float64 for gradient checks). An op is a
`Function` subclass with a `forward(ctx, ...)` that computes NumPy arrays and a `backward(ctx,
grad)` that returns one gradient per Tensor input. `Function.apply` runs forward and links the
output to its inputs only when a gradient is needed, so inference builds no graph at all.
Ops are coarse (a whole convolution, a whole batch norm): Python runs once per layer, NumPy
and Numba do the element work. With NANOQ4_PROFILE=1 every forward and backward is timed
(profile.py).
"""
import contextlib

import numpy as np

from . import profile

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Run without recording a graph (evaluation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Tensor:
    """An ndarray plus what reverse-mode autodiff needs: `grad`, `requires_grad` and `_ctx`,
    the Function that produced it (None for leaves such as parameters and inputs)."""

    def __init__(self, data, requires_grad=False, dtype=None):
        data = data.data if isinstance(data, Tensor) else data
        array = np.asarray(data, dtype=dtype)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        self.data = array
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = None
        self._graph_freed = False  # set when backward() has consumed the Function that made this

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad`.

        The graph is walked in a deterministic reverse topological order built iteratively
        (no recursion limit), a tensor used several times sums its gradients before its own
        backward runs, and each node's context is dropped once used, freeing saved arrays.
        """
        if self._ctx is None and not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError("backward() without a gradient needs a scalar output")
            grad = np.ones_like(self.data)
        grads = {id(self): np.asarray(grad, dtype=self.dtype)}
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None and node._graph_freed:
                raise RuntimeError("backward() through a graph that an earlier backward() already "
                                   "freed; run the forward pass again")
            if ctx is None:  # a leaf: parameters and inputs keep their own gradient array
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            node._ctx, node._graph_freed = None, True
            with profile.timed(type(ctx).__name__ + ".backward"):
                parent_grads = ctx.backward(ctx, g)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            for parent, pg in zip(ctx.parents, parent_grads):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    def _topological_order(self):
        """Inputs before outputs; iterative depth-first post-order over tensors needing grad."""
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                for parent in reversed(node._ctx.parents):
                    if parent.requires_grad and id(parent) not in visited:
                        stack.append((parent, False))
        return order

    # Operators, defined in ops.py and attached there (keeps this file about the engine).


class Function:
    """Base class of every differentiable op. Subclasses define two static methods:

    forward(ctx, *args, **kwargs) -> ndarray   args are ndarrays where the caller passed Tensors
    backward(ctx, grad) -> one gradient (ndarray or None) per Tensor argument, in order
    """

    def __init__(self, parents):
        self.parents = parents
        self.needs_input_grad = tuple(p.requires_grad for p in parents)
        self.saved = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays

    @classmethod
    def apply(cls, *args, **kwargs):
        parents = tuple(a for a in args if isinstance(a, Tensor))
        ctx = cls(parents)
        needs_graph = _grad_enabled and any(ctx.needs_input_grad)
        if not needs_graph:
            ctx.needs_input_grad = (False,) * len(parents)
        with profile.timed(cls.__name__ + ".forward"):
            out = cls.forward(ctx, *(a.data if isinstance(a, Tensor) else a for a in args), **kwargs)
        out = Tensor(out, requires_grad=needs_graph)
        if needs_graph:
            out._ctx = ctx
        return out

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError
