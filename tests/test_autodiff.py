"""The autodiff engine (nanoq4/tensor.py) and the gradient checker the other tests rely on."""
import numpy as np
import pytest

from gradcheck import check_gradients
from nanoq4 import ops
from nanoq4.tensor import Function, Tensor, is_grad_enabled, no_grad


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# ----------------------------------------------------------------------------- the checker itself

class WrongSquare(Function):
    """x**2 with a deliberately wrong backward (drops the factor 2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad * x


class RightSquare(WrongSquare):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return 2 * grad * x


def test_checker_passes_on_a_correct_backward():
    x = leaf(np.random.default_rng(0).standard_normal((3, 4)))
    check_gradients(RightSquare.apply, [x])


def test_checker_fails_on_a_wrong_backward_elementwise():
    x = leaf(np.random.default_rng(0).standard_normal((3, 4)))
    with pytest.raises(AssertionError, match=r"input 0 \(shape \(3, 4\)\): max abs error"):
        check_gradients(WrongSquare.apply, [x])


def test_checker_fails_on_a_wrong_backward_along_random_directions():
    x = leaf(np.random.default_rng(0).standard_normal((40, 40)))  # > max_elementwise values
    with pytest.raises(AssertionError, match="along random direction"):
        check_gradients(WrongSquare.apply, [x])
    check_gradients(RightSquare.apply, [x])


def test_checker_names_the_failing_input():
    a, b = leaf([1.0, 2.0]), leaf([3.0, -4.0])
    with pytest.raises(AssertionError, match="weight"):
        check_gradients(lambda a, b: a * WrongSquare.apply(b), [a, b], names=["x", "weight"])


def test_checker_refuses_float32_inputs():
    with pytest.raises(ValueError, match="float64"):
        check_gradients(RightSquare.apply, [leaf([1.0, 2.0], dtype=np.float32)])


def test_checker_leaves_inputs_unchanged():
    values = np.random.default_rng(1).standard_normal((20, 20))
    x = leaf(values.copy())
    check_gradients(RightSquare.apply, [x])
    np.testing.assert_array_equal(x.data, values)


# ----------------------------------------------------------------------------- gradient accumulation

def test_tensor_used_twice_in_one_op_accumulates():
    x = leaf([1.5, -2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)


def test_diamond_graph_sums_both_paths():
    # x -> a = 2x, b = 3x -> c = a * b = 6x^2 -> dc/dx = 12x
    x = leaf([0.5, -1.0, 2.0])
    a = x * 2.0
    b = x * 3.0
    (a * b).sum().backward()
    np.testing.assert_allclose(x.grad, 12 * x.data)


def test_intermediate_used_twice_accumulates_before_its_backward():
    # h = x + 1 feeds two branches; its backward must run once, with the summed gradient.
    calls = []

    class CountingIdentity(Function):
        @staticmethod
        def forward(ctx, x):
            return x.copy()

        @staticmethod
        def backward(ctx, grad):
            calls.append(grad.copy())
            return grad

    x = leaf([1.0, 2.0])
    h = CountingIdentity.apply(x)
    (h * 2.0 + h * 5.0).sum().backward()
    assert len(calls) == 1, "a shared intermediate ran its backward more than once"
    np.testing.assert_allclose(calls[0], [7.0, 7.0])
    np.testing.assert_allclose(x.grad, [7.0, 7.0])


def test_leaf_gradients_accumulate_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * 4.0).sum().backward()
    np.testing.assert_allclose(x.grad, [7.0, 7.0])


def test_leaf_gradients_are_not_shared_between_leaves():
    # With a + b both leaves, Add's backward hands the same upstream array to both; in-place
    # updates of one gradient (clip_grad_norm scales in place) must not touch the other.
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).sum().backward()
    a.grad *= 10.0
    np.testing.assert_allclose(b.grad, [1.0, 1.0])


def test_input_without_requires_grad_gets_no_gradient():
    x = leaf([1.0, 2.0])
    c = Tensor(np.array([3.0, 4.0]))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, [3.0, 4.0])


def test_backward_order_is_deterministic_and_reverse_topological():
    def run():
        order = []

        def tagged(name):
            class Tag(Function):
                @staticmethod
                def forward(ctx, *xs):
                    return np.sum(xs, axis=0)

                @staticmethod
                def backward(ctx, grad):
                    order.append(name)
                    return tuple(grad for _ in ctx.parents)
            return Tag

        x = leaf([1.0, 2.0])
        a = tagged("a").apply(x)
        b = tagged("b").apply(x)
        c = tagged("c").apply(a, b)
        d = tagged("d").apply(a)
        out = tagged("out").apply(c, d)
        out.sum().backward()
        return order

    first = run()
    assert first == run(), "backward order changed between identical runs"
    position = {name: i for i, name in enumerate(first)}
    # every node's backward runs after all of its consumers'
    for consumer, producer in [("out", "c"), ("out", "d"), ("c", "a"), ("c", "b"), ("d", "a")]:
        assert position[consumer] < position[producer], f"{producer} ran before {consumer}: {first}"


def test_long_chain_backprops_without_recursion_error():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 5000], rtol=1e-9)


# ----------------------------------------------------------------------------- graph lifetime

def test_no_grad_builds_no_graph():
    x = leaf([1.0, -2.0])
    with no_grad():
        y = ops.relu(x * 2.0)
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert y._ctx is None
    assert not y.requires_grad


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()


def test_ops_on_constants_build_no_graph():
    y = Tensor(np.ones(3)) * 2.0
    assert y._ctx is None and not y.requires_grad


def test_graph_is_freed_after_backward():
    x = leaf([1.0, 2.0])
    h1 = x * 2.0
    h2 = ops.relu(h1)
    out = h2.sum()
    assert h1._ctx is not None and h2._ctx is not None
    out.backward()
    for name, t in [("h1", h1), ("h2", h2), ("out", out)]:
        assert t._ctx is None, f"{name} still holds its context after backward"


def test_second_backward_through_a_freed_graph_raises():
    x = leaf([1.0, 2.0])
    out = (x * 2.0).sum()
    out.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        out.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])  # unchanged by the refused call


def test_backward_through_a_freed_intermediate_raises():
    x = leaf([1.0, 2.0])
    h = ops.relu(x * 3.0)
    h.sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 2.0).sum().backward()  # h's own backward is gone: x would silently get nothing


def test_backward_on_non_scalar_without_gradient_raises():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()


def test_backward_on_non_scalar_with_explicit_gradient():
    x = leaf([1.0, 2.0])
    (x * 3.0).backward(np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad, [3.0, 30.0])


def test_backward_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(1)).backward()


def test_gradients_keep_the_float32_dtype():
    x = leaf(np.ones((2, 3)), dtype=np.float32)
    ops.mean(ops.relu(x * 2.0 + 1.0)).backward()
    assert x.grad.dtype == np.float32


def test_integer_data_becomes_float32():
    assert Tensor(np.arange(3)).dtype == np.float32
