"""Batch norm + ReLU + 2x2 max pool as one op (ops.batch_norm_relu_pool, run by nn.Sequential for
VGG's block ends) against the unfused chain batch_norm(relu=True) -> max_pool2d: the same bits
forward and backward, in training and eval, with ties and all-negative windows, under sync BN, and
for the whole VGG4bit; and the model's parameter names, which checkpoints store, are unchanged."""
import numpy as np
import pytest

from nanoq4 import kernels, models, nn, ops, profile
from nanoq4.tensor import Tensor, no_grad


def assert_same_bits(got, want, name):
    """Equal bit patterns (also the sign of a zero), not only equal values."""
    got, want = np.asarray(got), np.asarray(want)
    assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{name}: {got.dtype} {got.shape} vs {want.shape}"
    unsigned = f"u{got.itemsize}"
    np.testing.assert_array_equal(got.view(unsigned), want.view(unsigned), err_msg=f"{name} differs")


def bn_pool_inputs(shape, seed=0, ties=False):
    """float32 x, gamma, beta and running statistics (beta -20 on channel 0: every value of it is
    negative before the ReLU). ties: x of small integers, so windows hold equal values."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape) * 1.5 + 0.3
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.uniform(-0.5, 0.5, c)
    beta[0] = -20.0
    running = rng.uniform(-0.2, 0.2, c), rng.uniform(0.5, 2.0, c)
    return [a.astype(np.float32) for a in (x, gamma, beta, *running)]


def run_chain(fused, x, gamma, beta, running_mean, running_var, upstream, training=True, sync=None):
    """Forward and backward of the fused op or of the unfused chain, on copies of the inputs ->
    dict of the pooled output, the running statistics after it, and the gradients."""
    xt, gt, bt = (Tensor(a.copy(), requires_grad=True) for a in (x, gamma, beta))
    rm, rv = running_mean.copy(), running_var.copy()
    if fused:
        out = ops.batch_norm_relu_pool(xt, gt, bt, rm, rv, training=training, sync=sync)
    else:
        out = ops.max_pool2d(ops.batch_norm(xt, gt, bt, rm, rv, training=training, relu=True, sync=sync), 2)
    out.backward(upstream)
    return dict(out=out.data, running_mean=rm, running_var=rv, dx=xt.grad, dgamma=gt.grad, dbeta=bt.grad)


SHAPES = [(4, 8, 8, 16), (3, 7, 5, 6), (2, 2, 2, 3)]  # even as in VGG, odd, one window per image


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_op_equals_batch_norm_then_max_pool_bit_for_bit(shape, training, ties):
    x, gamma, beta, rm, rv = bn_pool_inputs(shape, ties=ties)
    upstream = np.random.default_rng(1).standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    upstream = upstream.astype(np.float32)
    fused = run_chain(True, x, gamma, beta, rm, rv, upstream, training)
    unfused = run_chain(False, x, gamma, beta, rm, rv, upstream, training)
    for name in unfused:
        assert_same_bits(fused[name], unfused[name], name)
    assert np.all(fused["out"][..., 0] == 0) and np.all(fused["dx"][..., 0] == 0), "channel 0: ReLU off"
    assert np.any(fused["out"][..., 1:] > 0)


def test_the_gradient_of_a_tie_goes_to_the_first_maximum_in_window_order():
    x = np.array([[1.0, 3.0], [3.0, 3.0]], np.float32).reshape(1, 2, 2, 1)
    xt = Tensor(x, requires_grad=True)
    out = ops.batch_norm_relu_pool(xt, Tensor(np.ones(1, np.float32)), Tensor(np.zeros(1, np.float32)),
                                   np.zeros(1, np.float32), np.ones(1, np.float32), training=False, eps=0.0)
    out.backward(np.ones((1, 1, 1, 1), np.float32))
    np.testing.assert_array_equal(xt.grad.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


def other_rank(contributions):
    """A sync hook standing in for a second rank: call k adds contributions[k] = (sums, count), the
    other rank's part (forward statistics first, then the backward sums). Records what it was given."""
    calls = []

    def sync(sums, m):
        calls.append((sums.copy(), m))
        extra, extra_m = contributions[len(calls) - 1]
        return sums + extra, m + extra_m

    return sync, calls


def test_sync_batch_norm_gets_and_gives_what_the_unfused_chain_does():
    shape = (2, 6, 4, 5)
    x, gamma, beta, rm, rv = bn_pool_inputs(shape, seed=2)
    other_x = np.random.default_rng(3).standard_normal((3 * 6 * 4, 5)).astype(np.float32) * 2 + 1
    other_grad_sums = np.random.default_rng(4).standard_normal((2, 5))
    contributions = [(kernels.channel_sums(other_x), len(other_x)), (other_grad_sums, len(other_x))]
    upstream = np.random.default_rng(5).standard_normal((2, 3, 2, 5)).astype(np.float32)
    results = {}
    for fused in (True, False):
        sync, calls = other_rank(contributions)
        results[fused] = run_chain(fused, x, gamma, beta, rm, rv, upstream, sync=sync), calls
    (fused, fused_calls), (unfused, unfused_calls) = results[True], results[False]
    for name in unfused:
        assert_same_bits(fused[name], unfused[name], name)
    assert len(fused_calls) == len(unfused_calls) == 2, "one call for the statistics, one for the backward sums"
    for (sums, m), (want_sums, want_m) in zip(fused_calls, unfused_calls):
        assert m == want_m
        assert_same_bits(sums, want_sums, "sums handed to sync")


# ----------------------------------------------------------------------------- in models

def layer_by_layer(model, x):
    """The model's layers one at a time: the unfused path."""
    for layer in model.layers:
        x = layer(x)
    return x


def op_calls(model, x):
    """The model's output for x (no graph) and {op: calls} of that forward."""
    with no_grad(), profile.profiling():
        out = model(x)
    return out.data, dict(profile.calls)


@pytest.mark.parametrize("pool, bn_relu, fuses", [
    (nn.MaxPool2d(2), True, True),
    (nn.MaxPool2d(2), False, False),          # no ReLU between them
    (nn.MaxPool2d(3), True, False),           # another window
    (nn.MaxPool2d(2, stride=1), True, False),  # overlapping windows
], ids=["bn-relu-pool2", "bn-pool2", "pool3", "stride1"])
def test_sequential_fuses_only_a_relu_batch_norm_followed_by_a_2x2_pool(pool, bn_relu, fuses):
    model = nn.Sequential(nn.BatchNorm2d(3, relu=bn_relu), pool)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32))
    got, calls = op_calls(model, x)
    assert ("BatchNormReluPool.forward" in calls) == fuses, calls
    assert ("MaxPool2d.forward" in calls) != fuses, calls
    with no_grad():
        assert_same_bits(got, layer_by_layer(model, x).data, "output")


def test_a_batch_norm_at_the_end_of_a_sequential_is_not_fused():
    model = nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(3, relu=True))
    _, calls = op_calls(model, Tensor(np.ones((2, 4, 4, 3), np.float32)))
    assert "BatchNormReluPool.forward" not in calls


def conv_bn_model(seed=0, conv_bias=True):
    """conv -> BN-ReLU -> pool -> conv -> BN-ReLU, in eval with running statistics away from 0 and 1."""
    nn.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(4, relu=True),
                          nn.MaxPool2d(2), nn.QConv2d(4, 5, 3, padding=1, bias=conv_bias),
                          nn.BatchNorm2d(5, relu=True))
    rng = np.random.default_rng(seed)
    for bn in (model[1], model[4]):
        c = len(bn.running_mean)
        bn.running_mean[...] = rng.uniform(-0.3, 0.3, c)
        bn.running_var[...] = rng.uniform(0.5, 2.0, c)
        bn.bias.data[...] = rng.uniform(-0.3, 0.3, c)
    return model.eval()


@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "no-bias"])
def test_eval_batch_norm_adding_the_conv_bias_gives_the_layer_by_layer_bits(conv_bias):
    model = conv_bn_model(conv_bias=conv_bias)
    x = Tensor(np.random.default_rng(1).standard_normal((3, 6, 6, 3)).astype(np.float32))
    with no_grad():
        assert_same_bits(model(x).data, layer_by_layer(model, x).data, "eval output")


@pytest.mark.parametrize("pooled", [False, True], ids=["bn", "bn-pool"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_with_input_bias_equals_adding_it_first_bit_for_bit(training, pooled):
    """Forward, running statistics and every gradient, that of the bias being the sum of dx."""
    x, gamma, beta, rm, rv = bn_pool_inputs((3, 6, 4, 5), seed=6)
    bias = np.random.default_rng(7).uniform(-1, 1, 5).astype(np.float32)
    upstream = np.random.default_rng(8).standard_normal((3, 3, 2, 5) if pooled else x.shape).astype(np.float32)
    op = ops.batch_norm_relu_pool if pooled else lambda *a, **k: ops.batch_norm(*a, relu=True, **k)
    results = {}
    for fused in (True, False):
        xt, gt, bt, biast = (Tensor(a.copy(), requires_grad=True) for a in (x, gamma, beta, bias))
        r_mean, r_var = rm.copy(), rv.copy()
        if fused:
            out = op(xt, gt, bt, r_mean, r_var, training=training, input_bias=biast)
        else:
            out = op(xt + biast, gt, bt, r_mean, r_var, training=training)
        out.backward(upstream)
        results[fused] = dict(out=out.data, running_mean=r_mean, running_var=r_var, dx=xt.grad, dgamma=gt.grad,
                              dbeta=bt.grad, dbias=biast.grad)
    # the bias's gradient as Conv2d.backward sums it (Add's unbroadcast sums in another order)
    results[False]["dbias"] = results[False]["dx"].reshape(-1, 5).sum(axis=0)
    for name in results[False]:
        assert_same_bits(results[True][name], results[False][name], name)


def test_a_batch_norm_takes_the_bias_of_a_convolution_only():
    model = conv_bn_model()
    assert model[1].takes_bias_of(model[0])
    assert not model[1].takes_bias_of(model[2]), "not a convolution"
    assert not conv_bn_model(conv_bias=False)[1].takes_bias_of(model[0].__class__(3, 4, 3, bias=False))


def test_vgg4bit_runs_each_block_end_fused():
    _, calls = op_calls(models.vgg4bit().eval(), Tensor(np.zeros((1, 32, 32, 3), np.float32)))
    assert calls.get("BatchNormReluPool.forward") == 3 and "MaxPool2d.forward" not in calls, calls
    assert calls.get("BatchNorm.forward") == 3 + 1, "the first BN of each block and the BN1d stay unfused"


def test_vgg4bit_training_step_equals_the_unfused_layers_bit_for_bit():
    model = models.vgg4bit(dropout=0.5)
    x = Tensor(np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32))
    labels = np.array([0, 3, 9, 3])
    start = model.state_dict()
    results = {}
    for name, forward in (("fused", lambda m, x: m(x)), ("unfused", layer_by_layer)):
        model.load_state_dict(start)
        model.train().zero_grad()
        nn.manual_seed(7)  # the same dropout mask
        logits = forward(model, x)
        ops.cross_entropy(logits, labels).backward()
        with no_grad():
            eval_logits = forward(model.eval(), x)
        results[name] = dict(logits=logits.data, eval_logits=eval_logits.data, **model.state_dict(),
                             **{f"{n}.grad": p.grad for n, p in model.named_parameters()})
    fused, unfused = results["fused"], results["unfused"]
    assert fused.keys() == unfused.keys()
    for name in unfused:
        assert_same_bits(fused[name], unfused[name], name)


def test_vgg4bit_parameter_names_are_those_checkpoints_and_model_files_store():
    """Fusing runs the pair as one op but keeps both layers: indices 4, 9, 14 stay the pools."""
    convs, batch_norms, linears = (0, 2, 5, 7, 10, 12), (1, 3, 6, 8, 11, 13, 17), (16, 19)
    expected = set()
    for i in convs + linears:
        expected |= {f"layers.{i}.weight", f"layers.{i}.bias"}
    for i in batch_norms:
        expected |= {f"layers.{i}.{name}" for name in ("weight", "bias", "running_mean", "running_var")}
    model = models.vgg4bit()
    assert set(model.state_dict()) == expected
    assert [type(model[i]).__name__ for i in (4, 9, 14)] == ["MaxPool2d"] * 3
