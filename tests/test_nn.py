"""Modules (nanoq4/nn.py): parameters and their names, state dicts, train/eval, initialization."""
import numpy as np
import pytest

from nanoq4 import nn, ops
from nanoq4.errors import NanoQ4Error
from nanoq4.tensor import Tensor


def small_cnn(classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16, relu=True),
        nn.GlobalAvgPool(),
        nn.Dropout(0.5),
        nn.Linear(16, classes),
    )


def images(n=4, size=8, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32))


# ----------------------------------------------------------------------------- parameters

def test_parameter_count_matches_hand_count():
    model = small_cnn()
    expected = (8 * 3 * 3 * 3 + 8) + (8 + 8) + (16 * 3 * 3 * 8) + (16 + 16) + (10 * 16 + 10)
    assert model.num_parameters() == expected
    assert sum(p.size for p in model.parameters()) == expected


def test_parameter_names_in_definition_order():
    names = [name for name, _ in small_cnn().named_parameters()]
    assert names == [
        "layers.0.weight", "layers.0.bias",
        "layers.1.weight", "layers.1.bias",
        "layers.4.weight",
        "layers.5.weight", "layers.5.bias",
        "layers.8.weight", "layers.8.bias",
    ]


def test_parameter_shapes_and_dtypes():
    conv, linear = nn.Conv2d(3, 5, kernel_size=3), nn.Linear(7, 2)
    assert conv.weight.shape == (5, 3, 3, 3) and conv.bias.shape == (5,)
    assert linear.weight.shape == (2, 7) and linear.bias.shape == (2,)
    for p in conv.parameters() + linear.parameters():
        assert isinstance(p, nn.Parameter) and p.requires_grad and p.dtype == np.float32


def test_layers_without_bias_have_no_bias_parameter():
    assert [n for n, _ in nn.Conv2d(3, 4, bias=False).named_parameters()] == ["weight"]
    assert [n for n, _ in nn.Linear(3, 4, bias=False).named_parameters()] == ["weight"]


def test_buffers_are_the_batch_norm_running_statistics():
    names = [name for name, _ in small_cnn().named_buffers()]
    assert names == ["layers.1.running_mean", "layers.1.running_var",
                     "layers.5.running_mean", "layers.5.running_var"]


def test_nested_modules_are_found():
    class Block(nn.Module):
        def __init__(self):
            self.conv = nn.Conv2d(2, 2, 1)
            self.norm = nn.BatchNorm2d(2)

    class Net(nn.Module):
        def __init__(self):
            self.blocks = [Block(), Block()]
            self.head = nn.Linear(2, 3)

    net = Net()
    names = [name for name, _ in net.named_parameters()]
    assert names[:4] == ["blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight", "blocks.0.norm.bias"]
    assert names[-2:] == ["head.weight", "head.bias"]
    assert len(list(net.modules())) == 1 + 2 * 3 + 1


def test_zero_grad_clears_every_gradient():
    model = small_cnn()
    ops.cross_entropy(model(images()), np.array([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- state dicts

def test_state_dict_round_trip_reproduces_outputs():
    nn.manual_seed(1)
    source = small_cnn()
    source(images(seed=1))  # move the running statistics away from their initial values
    nn.manual_seed(2)
    target = small_cnn()
    target.load_state_dict(source.state_dict())
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    source.eval(), target.eval()
    np.testing.assert_array_equal(source(images()).data, target(images()).data)


def test_state_dict_holds_copies():
    model = nn.Linear(3, 2)
    state = model.state_dict()
    state["weight"][...] = 42.0
    assert not np.any(model.weight.data == 42.0)


def test_load_state_dict_copies_in_place():
    model = nn.BatchNorm1d(3)
    weight_array, running_mean_array = model.weight.data, model.running_mean
    state = model.state_dict()
    state["weight"] = np.full(3, 2.0)
    state["running_mean"] = np.full(3, 0.5)
    model.load_state_dict(state)
    assert model.weight.data is weight_array and model.running_mean is running_mean_array
    np.testing.assert_array_equal(model.weight.data, 2.0)
    np.testing.assert_array_equal(model.running_mean, 0.5)


def test_load_state_dict_refuses_a_missing_entry_by_name():
    model = small_cnn()
    state = model.state_dict()
    del state["layers.5.running_var"]
    with pytest.raises(NanoQ4Error, match=r"layers\.5\.running_var"):
        model.load_state_dict(state)


def test_load_state_dict_refuses_an_unexpected_entry_by_name():
    model = small_cnn()
    state = model.state_dict()
    state["layers.9.weight"] = np.zeros(3)
    with pytest.raises(NanoQ4Error, match=r"layers\.9\.weight"):
        model.load_state_dict(state)


def test_load_state_dict_refuses_a_wrong_shape_by_name_and_changes_nothing_before_it():
    model = small_cnn(classes=10)
    before = model.state_dict()
    state = small_cnn(classes=100).state_dict()
    with pytest.raises(NanoQ4Error, match=r"layers\.8\.weight.*\(100, 16\).*\(10, 16\)"):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():  # a refused load leaves no half-loaded model
        np.testing.assert_array_equal(value, before[name], err_msg=name)


# ----------------------------------------------------------------------------- train / eval

def test_train_and_eval_propagate_to_every_submodule():
    model = nn.Sequential(small_cnn(), nn.Sequential(nn.Dropout(0.1)))
    assert model.eval() is model
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.train(False)
    assert all(not m.training for m in model.modules())


def test_batch_norm_module_eval_uses_running_stats():
    bn = nn.BatchNorm2d(3)
    x = images(n=8, size=4, seed=3)
    bn(x)  # one training step updates the running statistics
    x2 = x.data.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(bn.running_mean, 0.1 * x2.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * x2.var(axis=0, ddof=1), rtol=1e-5)
    bn.eval()
    running_mean, running_var = bn.running_mean.copy(), bn.running_var.copy()
    out = bn(x).data
    np.testing.assert_allclose(out, (x.data - running_mean) / np.sqrt(running_var + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bn.running_mean, running_mean)


def test_set_batch_norm_momentum_reaches_every_batch_norm_and_its_update():
    """airbench's fast momentum 0.4: running <- 0.6 * running + 0.4 * batch, in every batch norm."""
    model = small_cnn()
    nn.set_batch_norm_momentum(model, 0.4)
    assert (model[1].momentum, model[5].momentum) == (0.4, 0.4)
    bn = nn.Sequential(nn.BatchNorm2d(3))
    nn.set_batch_norm_momentum(bn, 0.4)
    x = images(n=8, size=4, seed=3)
    bn(x)
    x2 = x.data.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(bn[0].running_mean, 0.4 * x2.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn[0].running_var, 0.6 + 0.4 * x2.var(axis=0, ddof=1), rtol=1e-5)


def test_batch_norm_rejects_the_wrong_rank():
    with pytest.raises(ValueError, match="4-D"):
        nn.BatchNorm2d(3)(Tensor(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match="2-D"):
        nn.BatchNorm1d(3)(images())


# ----------------------------------------------------------------------------- batch-norm re-estimation

def quantized_cnn():
    """Quantized conv and linear layers, both batch norms and dropout, with running statistics far
    from the data's, which a re-estimation must replace rather than blend in."""
    nn.manual_seed(4)
    model = nn.Sequential(
        nn.QConv2d(3, 6, padding=1, per_channel=True), nn.BatchNorm2d(6, relu=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.QLinear(4 * 4 * 6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    rng = np.random.default_rng(5)
    for bn in (model[1], model[5]):
        bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.weight.shape)
        bn.bias.data[...] = rng.uniform(-0.5, 0.5, bn.bias.shape)
        bn.running_mean[...], bn.running_var[...] = 5.0, 9.0
    return model


def batches_of_different_statistics():
    rng = np.random.default_rng(6)
    return [(rng.standard_normal((8, 8, 8, 3)) * (1 + k) + k).astype(np.float32) for k in range(3)]


def batch_norm_statistics_by_numpy(model, batches):
    """[(mean, var)] per batch norm: the average over `batches` of the per-channel batch mean and
    unbiased batch variance, in float64, each batch normalized with its own (biased) statistics on
    the way, as in training mode; dropout skipped."""
    stats = {}
    for x in batches:
        h = x
        for layer in model.layers:
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                rows = h.reshape(-1, h.shape[-1]).astype(np.float64)
                stats.setdefault(id(layer), []).append((rows.mean(axis=0), rows.var(axis=0, ddof=1)))
                h = (h - rows.mean(axis=0)) / np.sqrt(rows.var(axis=0) + layer.eps) * layer.weight.data + layer.bias.data
                h = (np.maximum(h, 0) if layer.relu else h).astype(np.float32)
            elif not isinstance(layer, nn.Dropout):
                h = layer(Tensor(h)).data
    return [tuple(np.mean(s, axis=0)) for s in stats.values()]


def test_reestimated_statistics_are_the_average_of_the_batch_statistics():
    model = quantized_cnn()
    batches = batches_of_different_statistics()
    expected = batch_norm_statistics_by_numpy(model, batches)
    assert nn.reestimate_batch_norm(model, batches) == 3
    for (mean, var), bn in zip(expected, (model[1], model[5])):
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-5)


def test_reestimation_changes_nothing_but_the_statistics():
    """No weight, gradient, dropout draw (the training's random stream), momentum or mode changes."""
    model = quantized_cnn().train()
    weights = {name: p.data.copy() for name, p in model.named_parameters()}
    rng_state = nn.get_rng_state()
    nn.reestimate_batch_norm(model, batches_of_different_statistics())
    assert all(np.array_equal(p.data, weights[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert nn.get_rng_state() == rng_state, "dropout drew from the training's generator"
    assert all(m.training for m in model.modules()) and (model[1].momentum, model[5].momentum) == (0.1, 0.1)
    model.eval()
    nn.reestimate_batch_norm(model, batches_of_different_statistics())
    assert not any(m.training for m in model.modules())


def test_dropout_is_identity_in_eval_and_drops_in_train():
    drop = nn.Dropout(0.5)
    x = Tensor(np.ones((64, 64), np.float32))
    drop.eval()
    np.testing.assert_array_equal(drop(x).data, x.data)
    drop.train()
    out = drop(x).data
    assert set(np.unique(out)) == {0.0, 2.0}
    assert abs((out == 0).mean() - 0.5) < 0.05


def test_manual_seed_makes_init_and_dropout_reproducible():
    def run():
        nn.manual_seed(123)
        layer = nn.Linear(5, 4)
        mask = nn.Dropout(0.5)(Tensor(np.ones((3, 5), np.float32))).data
        return layer.weight.data, mask

    (w1, m1), (w2, m2) = run(), run()
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(m1, m2)


def test_rng_state_round_trip():
    nn.manual_seed(5)
    state = nn.get_rng_state()
    a = nn.Linear(4, 4).weight.data
    nn.set_rng_state(state)
    np.testing.assert_array_equal(nn.Linear(4, 4).weight.data, a)


# ----------------------------------------------------------------------------- initialization

@pytest.mark.parametrize("make,fan_in", [
    (lambda: nn.Linear(400, 300), 400),
    (lambda: nn.Conv2d(16, 64, kernel_size=3), 16 * 9),
    (lambda: nn.Conv2d(3, 200, kernel_size=5), 3 * 25),
])
def test_default_init_is_pytorch_kaiming_uniform(make, fan_in):
    nn.manual_seed(0)
    layer = make()
    bound = 1.0 / np.sqrt(fan_in)
    for name, p in layer.named_parameters():
        values = p.data.ravel()
        assert np.abs(values).max() <= bound, f"{name} exceeds 1/sqrt(fan_in)"
        if values.size >= 1000:  # roughly uniform on [-bound, bound]
            assert np.abs(values).max() > 0.98 * bound, f"{name} does not reach the bound"
            assert abs(values.mean()) < 0.05 * bound, f"{name} is not centred"
            np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.05, err_msg=name)
            histogram, _ = np.histogram(values, bins=10, range=(-bound, bound))
            assert histogram.min() > 0.7 * values.size / 10, f"{name} is not flat: {histogram}"


def test_batch_norm_init():
    bn = nn.BatchNorm2d(6)
    np.testing.assert_array_equal(bn.weight.data, np.ones(6))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(6))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(6))
    np.testing.assert_array_equal(bn.running_var, np.ones(6))
    assert bn.weight.dtype == bn.running_var.dtype == np.float32


# ----------------------------------------------------------------------------- forward shapes

def test_forward_shapes_and_gradients_reach_every_parameter():
    model = small_cnn(classes=5)
    out = model(images(n=2, size=8))
    assert out.shape == (2, 5) and out.dtype == np.float32
    ops.cross_entropy(out, np.array([1, 4])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == np.float32, name
        assert np.all(np.isfinite(p.grad)), name


def test_flatten_and_conv_stride_module():
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1), nn.Flatten())
    assert model(images(n=2, size=9)).shape == (2, 5 * 5 * 4)
    assert len(model) == 2 and isinstance(model[1], nn.Flatten)
