"""Quantized layers (nanoq4/nn.py QConv2d, QLinear): the forward runs on grid weights, the
straight-through estimator passes gradients to the latent weight unchanged, the tanh soft clip
bounds the latent weights through the optimizer hook, and the float32 variant is a plain model."""
import numpy as np
import pytest

from gradcheck import check_gradients
from nanoq4 import models, nn, optim, quant
from nanoq4.tensor import Tensor
from nanoq4.train import TrainConfig, make_optimizer


def nhwc(n=2, size=6, channels=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, size, size, channels)).astype(dtype)


def plain_twin(qlayer):
    """A Conv2d/Linear with the same geometry whose weight is the fake-quantized latent weight."""
    w_q, _, _ = quant.fake_quantize(qlayer.weight.data, qlayer.bits, qlayer.per_channel)
    if isinstance(qlayer, nn.QConv2d):
        cout, k, _, cin = qlayer.weight.shape
        twin = nn.Conv2d(cin, cout, k, stride=qlayer.stride, padding=qlayer.padding)
    else:
        twin = nn.Linear(qlayer.weight.shape[1], qlayer.weight.shape[0])
    twin.weight.data[...] = w_q
    twin.bias.data[...] = qlayer.bias.data
    return twin


QLAYERS = {
    "QConv2d": (lambda **kw: nn.QConv2d(3, 5, 3, padding=1, **kw), lambda: nhwc()),
    "QConv2d_stride2": (lambda **kw: nn.QConv2d(3, 4, 3, stride=2, padding=1, **kw), lambda: nhwc(size=7)),
    "QLinear": (lambda **kw: nn.QLinear(12, 7, **kw),
                lambda: np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)),
}


# ----------------------------------------------------------------------------- straight-through estimator

@pytest.mark.parametrize("kind", list(QLAYERS))
def test_ste_latent_weight_gets_the_gradient_of_the_quantized_weight(kind):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(0)
    layer = make()
    twin = plain_twin(layer)
    x = inputs()
    v = np.random.default_rng(2).standard_normal(layer(Tensor(x)).shape).astype(np.float32)
    for m in (layer, twin):
        m.zero_grad()
        m(Tensor(x)).backward(v)
    np.testing.assert_array_equal(layer.weight.grad, twin.weight.grad,
                                  err_msg="STE must pass dL/dW_q to W unchanged (identity)")
    np.testing.assert_array_equal(layer.bias.grad, twin.bias.grad)


@pytest.mark.parametrize("kind", list(QLAYERS))
def test_ste_input_gradient_is_taken_through_the_quantized_weight(kind):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(0)
    layer = make()
    twin = plain_twin(layer)
    grads = []
    for m in (layer, twin):
        x = Tensor(inputs(), requires_grad=True)
        out = m(x)
        out.backward(np.ones(out.shape, np.float32))
        grads.append(x.grad)
    np.testing.assert_array_equal(grads[0], grads[1])


def test_fake_quantized_weight_differs_from_the_latent_weight():
    """Guard for the two tests above: the twin really uses W_q, which differs from W."""
    nn.manual_seed(0)
    layer = nn.QConv2d(3, 5, 3, padding=1)
    twin = plain_twin(layer)
    assert not np.array_equal(twin.weight.data, layer.weight.data)


def test_ste_has_the_latent_weight_as_its_only_parent():
    """w_q is data, not a graph node: the rounding leaves no trace in the graph and W gets dL/dW_q."""
    nn.manual_seed(0)
    layer = nn.QLinear(12, 7)
    w_q = layer.quantized_weight()
    assert isinstance(w_q._ctx, nn.STE) and w_q._ctx.parents == (layer.weight,)
    np.testing.assert_array_equal(w_q.data, quant.fake_quantize(layer.weight.data)[0])


def test_layers_run_the_fast_twin_of_fake_quantize(monkeypatch):
    calls = []
    real = quant.fake_quantize_fast
    monkeypatch.setattr(quant, "fake_quantize_fast", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    nn.manual_seed(0)
    layer = nn.QLinear(12, 7)
    layer(Tensor(np.ones((2, 12), np.float32)))
    assert len(calls) == 1 and calls[0][0] is layer.weight.data


# ----------------------------------------------------------------------------- grid weights in the forward

@pytest.mark.parametrize("kind", list(QLAYERS))
def test_forward_equals_plain_layer_with_fake_quantized_weight(kind):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(0)
    layer = make()
    x = Tensor(inputs())
    np.testing.assert_array_equal(layer(x).data, plain_twin(layer)(x).data)


def test_codes_and_scale_are_none_before_the_first_forward():
    layer = nn.QConv2d(3, 4, 3)
    assert layer.codes is None and layer.scale is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["QConv2d", "QLinear"])
def test_forward_weights_lie_on_the_symmetric_grid(kind, bits):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(bits)
    layer = make(bits=bits)
    layer(Tensor(inputs()))
    q = 2 ** (bits - 1) - 1
    assert layer.codes.dtype == np.int8 and layer.codes.shape == layer.weight.shape
    assert np.abs(layer.codes).max() == q, "the largest |W| must map to code +-qmax"
    assert len(np.unique(layer.codes)) <= 2 * q + 1
    assert layer.scale.shape == () and layer.scale.dtype == np.float32
    np.testing.assert_allclose(layer.scale, np.abs(layer.weight.data).max() / q, rtol=1e-6)
    grid_weights = np.unique(layer.codes.astype(np.float32) * layer.scale)
    assert len(grid_weights) <= 2 * q + 1


def test_four_bit_layer_uses_all_15_levels_from_minus_7_to_7():
    nn.manual_seed(0)
    layer = nn.QConv2d(64, 64, 3, padding=1)  # 36,864 weights: every level is in use
    layer(Tensor(nhwc(n=1, size=4, channels=64)))
    levels = np.unique(layer.codes)
    assert len(levels) == 15
    assert levels.min() == -7 and levels.max() == 7


def test_scale_is_recomputed_at_every_forward():
    nn.manual_seed(0)
    layer = nn.QLinear(8, 3)
    x = Tensor(np.ones((2, 8), np.float32))
    layer(x)
    first = float(layer.scale)
    layer.weight.data *= 2
    layer(x)
    assert float(layer.scale) == pytest.approx(2 * first, rel=1e-6)


@pytest.mark.parametrize("kind", ["QConv2d", "QLinear"])
def test_per_channel_gives_one_scale_per_output_channel(kind):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(0)
    layer = make(per_channel=True)
    layer(Tensor(inputs()))
    cout = layer.weight.shape[0]
    assert layer.scale.shape == (cout,)
    rows = layer.weight.data.reshape(cout, -1)
    np.testing.assert_allclose(layer.scale, np.abs(rows).max(axis=1) / 7, rtol=1e-6)
    assert np.all(np.abs(layer.codes.reshape(cout, -1)).max(axis=1) == 7), \
        "each output channel's largest weight must reach code +-7"


def test_per_channel_option_reaches_every_layer_of_a_model():
    model = models.build_model("simpleresnet4bit", per_channel=True)
    model.eval()(Tensor(nhwc(n=2, size=32)))
    for name, layer in models.quantized_layers(model):
        assert layer.scale.shape == (layer.weight.shape[0],), name


def test_quantized_codes_match_the_codes_of_the_last_forward():
    nn.manual_seed(0)
    layer = nn.QConv2d(3, 4, 3)
    layer(Tensor(nhwc()))
    codes, scale = layer.quantized_codes()
    np.testing.assert_array_equal(codes, layer.codes)
    np.testing.assert_array_equal(scale, layer.scale)


# ----------------------------------------------------------------------------- gradient checks (float64)

def as_float64(layer):
    layer.weight.data = layer.weight.data.astype(np.float64)
    layer.bias.data = layer.bias.data.astype(np.float64)
    return layer


@pytest.mark.parametrize("kind", list(QLAYERS))
def test_gradient_with_respect_to_the_input_matches_finite_differences(kind):
    make, inputs = QLAYERS[kind]
    nn.manual_seed(0)
    layer = as_float64(make())
    x = Tensor(inputs().astype(np.float64), requires_grad=True)
    out = layer(x)
    assert out.dtype == np.float64, "a float64 weight and input must give a float64 output"
    check_gradients(layer, [x], names=[f"{kind} input"])


def test_gradient_check_of_a_per_channel_3_bit_conv():
    nn.manual_seed(3)
    layer = as_float64(nn.QConv2d(2, 3, 3, padding=1, bits=3, per_channel=True))
    x = Tensor(nhwc(size=5, channels=2, dtype=np.float64), requires_grad=True)
    check_gradients(layer, [x], names=["QConv2d input"])


# ----------------------------------------------------------------------------- tanh soft clip hook

def small_qnet():
    nn.manual_seed(0)
    return nn.Sequential(nn.QConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, relu=True),
                         nn.GlobalAvgPool(), nn.QLinear(4, 3))


def step_with_huge_gradients(model, opt, steps=3, size=1e6):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = (size * rng.choice([-1.0, 1.0], p.shape)).astype(np.float32)
        opt.step()


def test_default_training_config_attaches_the_tanh_clip_hook():
    opt = make_optimizer(small_qnet(), TrainConfig())
    assert len(opt.post_step_hooks) == 1
    hook = opt.post_step_hooks[0]
    assert isinstance(hook, optim.TanhSoftClip) and hook.alpha == 3.0 and hook.relative_k is None


def test_tanh_clip_bounds_quantized_weights_after_huge_gradient_steps():
    model = small_qnet()
    alpha = 0.5
    opt = make_optimizer(model, TrainConfig(tanh_alpha=alpha))
    step_with_huge_gradients(model, opt)
    for name, layer in models.quantized_layers(model):
        w = np.abs(layer.weight.data)
        # alpha * tanh(W / alpha) < alpha in exact arithmetic; in float32 tanh rounds to exactly
        # 1 beyond |x| ~ 9, so the bound reached by huge steps is |W| == alpha, never above.
        assert w.max() <= alpha, f"{name}: max |W| {w.max()} exceeds alpha {alpha}"
        assert w.max() >= 0.99 * alpha, f"{name}: huge steps should push |W| to the bound"


def test_tanh_clip_leaves_non_quantized_parameters_untouched():
    """Biases and BatchNorm parameters end exactly where the same optimizer without the hook
    puts them, far beyond alpha; only quantized weights differ between the two runs."""
    clipped, free = small_qnet(), small_qnet()
    step_with_huge_gradients(clipped, make_optimizer(clipped, TrainConfig(tanh_alpha=0.5)))
    step_with_huge_gradients(free, make_optimizer(free, TrainConfig(tanh_clip=False)))
    for (name, p), (_, q) in zip(clipped.named_parameters(), free.named_parameters()):
        if getattr(p, "quantized", False):
            assert not np.array_equal(p.data, q.data), f"{name} should have been clipped"
        else:
            np.testing.assert_array_equal(p.data, q.data, err_msg=f"{name} must not be clipped")
            assert np.abs(p.data).max() > 0.5


def test_only_quantized_weights_are_marked_for_the_clip():
    marked = [name for name, p in small_qnet().named_parameters() if getattr(p, "quantized", False)]
    assert marked == ["layers.0.weight", "layers.3.weight"]


def test_no_tanh_clip_attaches_no_hook():
    opt = make_optimizer(small_qnet(), TrainConfig(tanh_clip=False))
    assert opt.post_step_hooks == []


def test_fp32_training_attaches_no_hook():
    model = models.build_model("simpleresnet4bit", quantize=False)
    assert make_optimizer(model, TrainConfig(fp32=True)).post_step_hooks == []


@pytest.mark.parametrize("settings", [dict(tanh_alpha=0.3), dict(tanh_relative=2.0)],
                         ids=["absolute_alpha", "relative_alpha"])
def test_tanh_clip_hook_is_a_tanh_of_the_updated_weights(settings):
    """W <- a * tanh(W / a) on the weights the optimizer just produced, a = alpha or k * RMS(W)."""
    hooked, free = small_qnet(), small_qnet()
    opt_hooked = make_optimizer(hooked, TrainConfig(**settings))
    opt_free = make_optimizer(free, TrainConfig(tanh_clip=False))
    rng = np.random.default_rng(0)
    for p, q in zip(hooked.parameters(), free.parameters()):
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
        q.grad = p.grad.copy()
    opt_hooked.step()
    opt_free.step()
    for (name, layer), (_, twin) in zip(models.quantized_layers(hooked), models.quantized_layers(free)):
        w = twin.weight.data
        alpha = quant.rms_alpha(w, settings["tanh_relative"]) if "tanh_relative" in settings else 0.3
        expected = (np.float32(alpha) * np.tanh(w / np.float32(alpha))).astype(np.float32)
        np.testing.assert_allclose(layer.weight.data, expected, rtol=1e-6, atol=1e-9, err_msg=name)
        assert not np.allclose(w, expected, rtol=1e-3), f"{name}: alpha should bend these weights"


# ----------------------------------------------------------------------------- float32 variant

def on_grid_state(qmodel):
    """The quantized model's state with every quantized weight replaced by its grid value."""
    state = qmodel.state_dict()
    for name, layer in models.quantized_layers(qmodel):
        state[name + ".weight"] = quant.fake_quantize(layer.weight.data, layer.bits, layer.per_channel)[0]
    return state


@pytest.mark.parametrize("name", ["vgg4bit", "simpleresnet4bit"])
def test_fp32_variant_has_the_same_state_names_and_shapes(name):
    q = models.build_model(name).state_dict()
    f = models.build_model(name, quantize=False).state_dict()
    assert list(q) == list(f)
    assert [v.shape for v in q.values()] == [v.shape for v in f.values()]


@pytest.mark.parametrize("name", ["vgg4bit", "simpleresnet4bit"])
def test_fp32_variant_has_no_quantized_layers(name):
    model = models.build_model(name, quantize=False)
    assert models.quantized_layers(model) == []
    assert not any(getattr(p, "quantized", False) for p in model.parameters())


@pytest.mark.parametrize("name", ["vgg4bit", "simpleresnet4bit"])
def test_quantized_model_with_on_grid_weights_computes_the_fp32_model(name):
    """Quantizing weights that already lie on the grid is the identity, so both variants agree."""
    nn.manual_seed(0)
    qmodel = models.build_model(name)
    state = on_grid_state(qmodel)
    fmodel = models.build_model(name, quantize=False)
    fmodel.load_state_dict(state)
    qmodel.load_state_dict(state)
    x = Tensor(nhwc(n=2, size=32))
    np.testing.assert_array_equal(qmodel.eval()(x).data, fmodel.eval()(x).data)


def paper_vgg_by_hand(num_classes=10):
    """VGG4bit as the paper describes it, with unfused ReLUs: the float32 reference."""
    layers, cin = [], 3
    for cout in (64, 128, 256):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                   nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    layers += [nn.Flatten(), nn.Linear(4096, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.5),
               nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def test_fp32_vgg_equals_a_hand_built_sequential_with_the_same_weights():
    nn.manual_seed(0)
    model = models.vgg4bit(quantize=False)
    reference = paper_vgg_by_hand()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    rng = np.random.default_rng(0)
    values = [v + rng.uniform(0, 0.1, v.shape).astype(np.float32) for v in ours.values()]  # non-trivial BN stats
    model.load_state_dict(dict(zip(ours, values)))
    reference.load_state_dict(dict(zip(theirs, values)))
    x = Tensor(nhwc(n=2, size=32))
    np.testing.assert_allclose(model.eval()(x).data, reference.eval()(x).data, rtol=1e-5, atol=1e-5)
