"""Optional cross-check against PyTorch (not a dependency): forward values and gradients of each
op, and optimizer steps, equal torch's to 1e-4 in float32.

Layouts: nanoq4 images are NHWC and conv weights (Cout, KH, KW, Cin); torch wants NCHW and
(Cout, Cin, KH, KW). Both permutations are the same (0, 3, 1, 2); back is (0, 2, 3, 1).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nanoq4 import nn, ops, optim  # noqa: E402
from nanoq4.tensor import Tensor  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def data(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_torch(a, nchw=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if nchw:
        t = t.permute(0, 3, 1, 2).contiguous()
    return t.requires_grad_(True)


def from_torch(t, nchw=False):
    a = t.detach()
    if nchw:
        a = a.permute(0, 2, 3, 1)
    return a.numpy()


def compare(name, ours, theirs, nchw=False):
    np.testing.assert_allclose(ours, from_torch(theirs, nchw), **TOL, err_msg=name)


def backward_both(out, tout, seed, nchw=False):
    """Backpropagate the same random upstream gradient through both graphs."""
    g = data(out.shape, seed)
    out.backward(g)
    tg = torch.from_numpy(g)
    tout.backward(tg.permute(0, 3, 1, 2) if nchw else tg)


# ----------------------------------------------------------------------------- conv, pool

@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,pad,bias", [
    (2, 8, 8, 3, 4, 3, 1, 1, True),
    (2, 9, 7, 4, 5, 3, 2, 1, True),
    (1, 10, 10, 2, 3, 5, 2, 2, False),
    (3, 6, 6, 8, 4, 1, 1, 0, True),
    (2, 7, 7, 3, 2, 3, 1, 0, False),
])
def test_conv2d(n, h, w, cin, cout, k, stride, pad, bias):
    x, wt, b = data((n, h, w, cin), 0), data((cout, k, k, cin), 1) * 0.3, data((cout,), 2)
    tx, tw = to_torch(x, nchw=True), to_torch(wt, nchw=True)
    tb = to_torch(b) if bias else None
    X, W = Tensor(x, requires_grad=True), Tensor(wt, requires_grad=True)
    B = Tensor(b, requires_grad=True) if bias else None
    out = ops.conv2d(X, W, B, stride, pad)
    tout = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=pad)
    compare("forward", out.data, tout, nchw=True)
    backward_both(out, tout, 3, nchw=True)
    compare("input grad", X.grad, tx.grad, nchw=True)
    compare("weight grad", W.grad, tw.grad, nchw=True)
    if bias:
        compare("bias grad", B.grad, tb.grad)


@pytest.mark.parametrize("shape,k,stride", [((2, 8, 8, 3), 2, 2), ((2, 9, 7, 4), 3, 2), ((1, 7, 7, 2), 2, 2)])
def test_max_pool2d(shape, k, stride):
    x = data(shape, 0)
    tx, X = to_torch(x, nchw=True), Tensor(x, requires_grad=True)
    out = ops.max_pool2d(X, k, stride)
    tout = torch.nn.functional.max_pool2d(tx, k, stride)
    compare("forward", out.data, tout, nchw=True)
    backward_both(out, tout, 1, nchw=True)
    compare("input grad", X.grad, tx.grad, nchw=True)


def test_global_avg_pool():
    x = data((3, 5, 4, 6), 0)
    tx, X = to_torch(x, nchw=True), Tensor(x, requires_grad=True)
    out, tout = ops.global_avg_pool(X), tx.mean(dim=(2, 3))
    compare("forward", out.data, tout)
    backward_both(out, tout, 1)
    compare("input grad", X.grad, tx.grad, nchw=True)


# ----------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (16, 6)], ids=str)
def test_batch_norm_train_and_running_stats(shape, relu):
    c = shape[-1]
    nchw = len(shape) == 4
    x = data(shape, 0) * 2 + 1
    gamma, beta = 1 + 0.2 * data((c,), 1), 0.2 * data((c,), 2)
    rm, rv = 0.1 * data((c,), 3), 1 + 0.1 * np.abs(data((c,), 4))
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tx, tg, tb = to_torch(x, nchw), to_torch(gamma), to_torch(beta)
    X, G, B = (Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    out = ops.batch_norm(X, G, B, rm, rv, training=True, momentum=0.1, eps=1e-5, relu=relu)
    tout = torch.nn.functional.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)
    if relu:
        tout = torch.relu(tout)
    compare("forward", out.data, tout, nchw)
    compare("running_mean", rm, trm)
    compare("running_var", rv, trv)
    backward_both(out, tout, 5, nchw)
    compare("x grad", X.grad, tx.grad, nchw)
    compare("gamma grad", G.grad, tg.grad)
    compare("beta grad", B.grad, tb.grad)


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (16, 6)], ids=str)
def test_batch_norm_eval(shape):
    c = shape[-1]
    nchw = len(shape) == 4
    x = data(shape, 0) * 2 + 1
    gamma, beta = 1 + 0.2 * data((c,), 1), 0.2 * data((c,), 2)
    rm, rv = 0.5 * data((c,), 3), 1 + np.abs(data((c,), 4))
    tx, tg, tb = to_torch(x, nchw), to_torch(gamma), to_torch(beta)
    X, G, B = (Tensor(a, requires_grad=True) for a in (x, gamma, beta))
    out = ops.batch_norm(X, G, B, rm, rv, training=False)
    tout = torch.nn.functional.batch_norm(tx, torch.from_numpy(rm), torch.from_numpy(rv), tg, tb,
                                          training=False, eps=1e-5)
    compare("forward", out.data, tout, nchw)
    backward_both(out, tout, 5, nchw)
    compare("x grad", X.grad, tx.grad, nchw)
    compare("gamma grad", G.grad, tg.grad)
    compare("beta grad", B.grad, tb.grad)


def test_batch_norm_module_matches_torch_module_over_steps():
    ours, theirs = nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    for step in range(3):
        x = data((6, 3, 3, 4), step) * (step + 1) + step
        ours(Tensor(x))
        theirs(torch.from_numpy(x).permute(0, 3, 1, 2))
    compare("running_mean", ours.running_mean, theirs.running_mean)
    compare("running_var", ours.running_var, theirs.running_var)


# ----------------------------------------------------------------------------- dense, losses

@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    x, w, b = data((5, 7), 0), data((3, 7), 1), data((3,), 2)
    tx, tw = to_torch(x), to_torch(w)
    tb = to_torch(b) if bias else None
    X, W = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    B = Tensor(b, requires_grad=True) if bias else None
    out, tout = ops.linear(X, W, B), torch.nn.functional.linear(tx, tw, tb)
    compare("forward", out.data, tout)
    backward_both(out, tout, 3)
    compare("x grad", X.grad, tx.grad)
    compare("weight grad", W.grad, tw.grad)
    if bias:
        compare("bias grad", B.grad, tb.grad)


def test_matmul_relu_add_broadcast():
    a, b, c = data((4, 5), 0), data((5, 3), 1), data((3,), 2)
    ta, tb, tc = to_torch(a), to_torch(b), to_torch(c)
    A, B, C = (Tensor(v, requires_grad=True) for v in (a, b, c))
    out = ops.relu(ops.matmul(A, B) + C)
    tout = torch.relu(ta @ tb + tc)
    compare("forward", out.data, tout)
    backward_both(out, tout, 3)
    for name, ours, theirs in [("a", A, ta), ("b", B, tb), ("c", C, tc)]:
        compare(name, ours.grad, theirs.grad)


def test_log_softmax():
    x = data((6, 10), 0) * 3
    tx, X = to_torch(x), Tensor(x, requires_grad=True)
    out, tout = ops.log_softmax(X), torch.log_softmax(tx, dim=-1)
    compare("forward", out.data, tout)
    backward_both(out, tout, 1)
    compare("grad", X.grad, tx.grad)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(smoothing):
    x = data((8, 10), 0) * 3
    labels = np.random.default_rng(1).integers(0, 10, size=8)
    tx, X = to_torch(x), Tensor(x, requires_grad=True)
    out = ops.cross_entropy(X, labels, label_smoothing=smoothing)
    tout = torch.nn.functional.cross_entropy(tx, torch.from_numpy(labels), label_smoothing=smoothing)
    compare("forward", out.data, tout)
    out.backward()
    tout.backward()
    compare("grad", X.grad, tx.grad)


# ----------------------------------------------------------------------------- optimizers

def run_optimizer_pair(make_ours, make_theirs, steps=5):
    w0 = [data((4, 3), 0), data((3,), 1)]
    ours = [nn.Parameter(w.copy()) for w in w0]
    theirs = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in w0]
    opt, topt = make_ours(ours), make_theirs(theirs)
    for step in range(steps):
        for i, (p, tp) in enumerate(zip(ours, theirs)):
            g = data(p.shape, 10 * step + i + 2)
            p.grad = g
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for i, (p, tp) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"param {i}")


def test_sgd_nesterov_matches_torch():
    run_optimizer_pair(
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))


def test_sgd_momentum_matches_torch():
    run_optimizer_pair(lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9),
                       lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))


def test_adamw_matches_torch():
    run_optimizer_pair(
        lambda ps: optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05))


def test_clip_grad_norm_matches_torch():
    grads = [data((4, 3), 0) * 3, data((5,), 1) * 3]
    ours = [nn.Parameter(np.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, tp, g in zip(ours, theirs, grads):
        p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
    norm = optim.clip_grad_norm(ours, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm == pytest.approx(float(tnorm), rel=1e-5)
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-5, atol=1e-7)
