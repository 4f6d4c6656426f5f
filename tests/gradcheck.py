"""A float64 gradient checker: analytic gradients from `backward` against central differences.

The output of `fn` is projected on a fixed random vector v, so the checked scalar is
f(x) = <fn(x), v> and non-scalar outputs need no special case. Small inputs are checked element
by element; large ones along a few random unit directions d, comparing <grad f, d> with
(f(x + eps d) - f(x - eps d)) / (2 eps), the HIPS/autograd way, which costs two forward passes
per direction instead of two per element.
"""
import numpy as np

from nanoq4.tensor import Tensor, no_grad


def _projected(fn, inputs, v):
    """f(x) = <fn(*inputs), v>, evaluated without recording a graph."""
    with no_grad():
        out = fn(*inputs)
    return float(np.sum(out.data * v))


def _first_violation(analytic, numeric, rtol, atol):
    """Largest |analytic - numeric| and whether any entry exceeds atol + rtol * |numeric|."""
    error = np.abs(analytic - numeric)
    bad = error > atol + rtol * np.abs(numeric)
    worst = int(np.argmax(error))
    return worst, float(error.flat[worst]), bool(bad.any())


def check_gradients(fn, inputs, eps=1e-6, rtol=1e-5, atol=1e-7, max_elementwise=256,
                    n_directions=6, seed=0, names=None):
    """Assert that the backward pass of `fn(*inputs)` matches central differences.

    fn: maps the inputs to a Tensor (any shape). inputs: a sequence; the float64 Tensors with
    requires_grad=True among them are checked, anything else is passed to fn unchanged (labels,
    running statistics, ...). An input with at most `max_elementwise` values is checked element
    by element, a larger one along `n_directions` random unit directions. `names` labels the
    inputs in the failure message (default "input <position>").
    Raises AssertionError naming the input and the largest error. Returns the analytic gradients
    of the checked inputs, in order (useful to inspect them further).
    """
    inputs = list(inputs)
    names = names or [f"input {i}" for i in range(len(inputs))]
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("check_gradients: no input is a Tensor with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise ValueError(f"check_gradients: {names[i]} is {inputs[i].dtype}; central "
                             f"differences need float64 inputs")
    rng = np.random.default_rng(seed)

    for i in checked:
        inputs[i].grad = None
    out = fn(*inputs)
    if out.dtype != np.float64:
        raise ValueError(f"check_gradients: fn returned {out.dtype}, expected float64")
    v = rng.standard_normal(out.shape)
    out.backward(v)
    analytic_grads = []
    for i in checked:
        x = inputs[i]
        grad = np.zeros_like(x.data) if x.grad is None else np.asarray(x.grad)
        if grad.shape != x.shape:
            raise AssertionError(f"gradient of {names[i]} has shape {grad.shape}, "
                                 f"the input has shape {x.shape}")
        analytic_grads.append(grad)

    for i, grad in zip(checked, analytic_grads):
        x = inputs[i]
        original = x.data.copy()
        try:
            if x.size <= max_elementwise:
                numeric = np.empty(x.size)
                flat = x.data.reshape(-1)  # a view: perturbing it perturbs the input
                for k in range(x.size):
                    flat[k] = original.flat[k] + eps
                    f_plus = _projected(fn, inputs, v)
                    flat[k] = original.flat[k] - eps
                    f_minus = _projected(fn, inputs, v)
                    flat[k] = original.flat[k]
                    numeric[k] = (f_plus - f_minus) / (2 * eps)
                worst, error, failed = _first_violation(grad.reshape(-1), numeric, rtol, atol)
                if failed:
                    where = np.unravel_index(worst, x.shape)
                    raise AssertionError(
                        f"gradient check failed for {names[i]} (shape {x.shape}): max abs error "
                        f"{error:.3e} at index {tuple(int(j) for j in where)} (analytic "
                        f"{grad.reshape(-1)[worst]:.6e}, numeric {numeric[worst]:.6e}; "
                        f"rtol={rtol}, atol={atol})")
            else:
                directions = rng.standard_normal((n_directions,) + x.shape)
                directions /= np.sqrt((directions ** 2).sum(axis=tuple(range(1, directions.ndim)),
                                                            keepdims=True))
                numeric = np.empty(n_directions)
                for k, d in enumerate(directions):
                    x.data[...] = original + eps * d
                    f_plus = _projected(fn, inputs, v)
                    x.data[...] = original - eps * d
                    f_minus = _projected(fn, inputs, v)
                    numeric[k] = (f_plus - f_minus) / (2 * eps)
                x.data[...] = original
                projected = np.array([np.sum(grad * d) for d in directions])
                worst, error, failed = _first_violation(projected, numeric, rtol, atol)
                if failed:
                    raise AssertionError(
                        f"gradient check failed for {names[i]} (shape {x.shape}): max abs error "
                        f"{error:.3e} along random direction {worst} (analytic "
                        f"{projected[worst]:.6e}, numeric {numeric[worst]:.6e}; "
                        f"rtol={rtol}, atol={atol})")
        finally:
            x.data[...] = original
    return analytic_grads
