"""Optimizers, clipping, post-step hooks and schedules (nanoq4/optim.py). Expected values are
worked out by hand, step by step, in plain arithmetic: they do not reuse the implementation."""
import math

import numpy as np
import pytest

from nanoq4 import nn, optim

W0 = [1.0, -2.0]
G1 = [0.5, 0.25]
G2 = [-1.0, 0.5]


def param(values):
    return nn.Parameter(np.array(values))


def two_steps(opt, p, g1=G1, g2=G2):
    p.grad = np.array(g1, dtype=np.float32)
    opt.step()
    after_one = p.data.copy()
    p.grad = np.array(g2, dtype=np.float32)
    opt.step()
    return after_one, p.data.copy()


# ----------------------------------------------------------------------------- SGD

def test_sgd_plain():
    p = param(W0)
    w1, w2 = two_steps(optim.SGD([p], lr=0.1), p)
    np.testing.assert_allclose(w1, [1.0 - 0.05, -2.0 - 0.025], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.95 + 0.1, -2.025 - 0.05], rtol=1e-6)


def test_sgd_momentum():
    # lr 0.1, momentum 0.9: buf1 = g1; w1 = w0 - 0.1*buf1
    #   buf2 = 0.9*[0.5, 0.25] + [-1, 0.5] = [-0.55, 0.725]; w2 = w1 - 0.1*buf2
    p = param(W0)
    w1, w2 = two_steps(optim.SGD([p], lr=0.1, momentum=0.9), p)
    np.testing.assert_allclose(w1, [0.95, -2.025], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.95 + 0.055, -2.025 - 0.0725], rtol=1e-6)


def test_sgd_nesterov_with_weight_decay():
    # lr 0.1, momentum 0.9, Nesterov, weight decay 0.01 (coupled: added to the gradient)
    # step 1: d1 = g1 + 0.01*w0 = [0.51, 0.23]; buf1 = d1; step = d1 + 0.9*buf1 = [0.969, 0.437]
    #         w1 = w0 - 0.1*step = [0.9031, -2.0437]
    # step 2: d2 = g2 + 0.01*w1 = [-0.990969, 0.479563]
    #         buf2 = 0.9*buf1 + d2 = [0.459 - 0.990969, 0.207 + 0.479563] = [-0.531969, 0.686563]
    #         step = d2 + 0.9*buf2 = [-1.4697411, 1.0974697]; w2 = w1 - 0.1*step
    p = param(W0)
    w1, w2 = two_steps(optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), p)
    np.testing.assert_allclose(w1, [0.9031, -2.0437], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.9031 + 0.14697411, -2.0437 - 0.10974697], rtol=1e-6)


def test_sgd_skips_parameters_without_gradient():
    p, q = param(W0), param(W0)
    opt = optim.SGD([p, q], lr=0.1, momentum=0.9, weight_decay=0.1)
    p.grad = np.array(G1, dtype=np.float32)
    opt.step()
    np.testing.assert_array_equal(q.data, np.array(W0, dtype=np.float32))


# ----------------------------------------------------------------------------- AdamW

def test_adamw_two_steps_with_bias_correction_and_decoupled_decay():
    # lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.1 (decoupled: w *= 1 - lr*wd = 0.99)
    # step 1: w = 0.99*w0 = [0.99, -1.98]; m1 = 0.1*g1 = [0.05, 0.025]; v1 = 0.001*g1^2
    #         m_hat = m1/0.1 = g1, v_hat = v1/0.001 = g1^2 -> the step is lr*sign(g1) = 0.1
    #         w1 = [0.89, -2.08]
    # step 2: w = 0.99*w1 = [0.8811, -2.0592]; m2 = 0.9*m1 + 0.1*g2 = [-0.055, 0.0725]
    #         v2 = 0.999*v1 + 0.001*g2^2 = [0.00124975, 0.0003124375]
    #         m_hat = m2/(1 - 0.9^2) = m2/0.19; v_hat = v2/(1 - 0.999^2) = v2/0.001999
    p = param(W0)
    w1, w2 = two_steps(optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), p)
    np.testing.assert_allclose(w1, [0.89, -2.08], rtol=1e-6)
    step = [0.1 * (-0.055 / 0.19) / (math.sqrt(0.00124975 / 0.001999) + 1e-8),
            0.1 * (0.0725 / 0.19) / (math.sqrt(0.0003124375 / 0.001999) + 1e-8)]
    np.testing.assert_allclose(w2, [0.8811 - step[0], -2.0592 - step[1]], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.91771035, -2.15571820], rtol=1e-6)


def test_adamw_without_decay_first_step_is_lr_times_sign():
    p = param([3.0, -1.0, 0.5])
    opt = optim.AdamW([p], lr=0.01, weight_decay=0.0)
    p.grad = np.array([2.0, -0.001, 50.0], dtype=np.float32)
    opt.step()
    np.testing.assert_allclose(p.data, [3.0 - 0.01, -1.0 + 0.01, 0.5 - 0.01], rtol=1e-5)


def test_adamw_bias_correction_counts_each_parameters_own_updates():
    # q gets no gradient in step 1, so its first update (in step 2) is its first Adam step:
    # bias-corrected with t = 1, i.e. lr * sign(g) exactly (t = 2 would move it 0.744 lr).
    p, q = param([1.0]), param([3.0, -1.0])
    opt = optim.AdamW([p, q], lr=0.01, weight_decay=0.0)
    p.grad = np.array([1.0], dtype=np.float32)
    opt.step()
    p.grad, q.grad = np.array([1.0], dtype=np.float32), np.array([2.0, -0.5], dtype=np.float32)
    opt.step()
    np.testing.assert_allclose(q.data, [3.0 - 0.01, -1.0 + 0.01], rtol=1e-6)
    assert opt.state[0][1][2] == 1 and opt.state[0][0][2] == 2


def test_adamw_resumes_from_a_two_entry_state_of_older_checkpoints():
    p, q = param(W0), param(W0)
    old = optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    new = optim.AdamW([q], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for opt, t in ((old, p), (new, q)):
        t.grad = np.array(G1, dtype=np.float32)
        opt.step()
    state = old.state_dict()
    state["state"] = [[s[:2] for s in group] for group in state["state"]]  # as written before (m, v, t)
    old.load_state_dict(state)
    for opt, t in ((old, p), (new, q)):
        t.grad = np.array(G2, dtype=np.float32)
        opt.step()
    np.testing.assert_array_equal(p.data, q.data)


# ----------------------------------------------------------------------------- parameter groups

def decay_model():
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_param_groups_decay_only_multi_dimensional_tensors():
    model = decay_model()
    decay, no_decay = optim.param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.parametrize("make", [lambda g: optim.SGD(g, lr=0.1, momentum=0.9),
                                  lambda g: optim.AdamW(g, lr=0.1)], ids=["sgd", "adamw"])
def test_param_groups_with_zero_gradients_shrink_only_weights(make):
    model = decay_model()
    opt = make(optim.param_groups(model, weight_decay=0.1))
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = np.zeros_like(p.data)
    opt.step()
    for name, p in model.named_parameters():
        if name == "layers.0.weight":
            np.testing.assert_allclose(p.data, before[name] * (1 - 0.1 * 0.1), rtol=1e-6)
        else:
            np.testing.assert_array_equal(p.data, before[name], err_msg=f"{name} was decayed")


def test_optimizer_zero_grad_and_parameters():
    model = decay_model()
    opt = optim.SGD(optim.param_groups(model, 0.1), lr=0.1)
    assert len(opt.parameters()) == 4
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda ps: optim.AdamW(ps, lr=0.1)], ids=["sgd", "adamw"])
def test_optimizer_state_dict_round_trip_continues_identically(make):
    p, q = param(W0), param(W0)
    a, b = make([p]), make([q])
    p.grad = np.array(G1, dtype=np.float32)
    a.step()
    b.load_state_dict(a.state_dict())
    q.data[...] = p.data
    for t in (p, q):
        t.grad = np.array(G2, dtype=np.float32)
    a.step()
    b.step()
    np.testing.assert_array_equal(p.data, q.data)


# ----------------------------------------------------------------------------- clipping

def test_clip_grad_norm_returns_the_norm_before_and_clips_to_max_norm():
    p, q, unused = param([0.0, 0.0]), param([0.0]), param([0.0])
    p.grad = np.array([3.0, 0.0], dtype=np.float32)
    q.grad = np.array([4.0], dtype=np.float32)
    norm = optim.clip_grad_norm([p, q, unused], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    after = math.sqrt(float((p.grad ** 2).sum() + (q.grad ** 2).sum()))
    assert after == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(p.grad, [0.6, 0.0], rtol=1e-5)   # direction kept
    np.testing.assert_allclose(q.grad, [0.8], rtol=1e-5)
    assert unused.grad is None


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = param([0.0, 0.0])
    p.grad = np.array([0.3, 0.4], dtype=np.float32)
    assert optim.clip_grad_norm([p], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(p.grad, np.array([0.3, 0.4], dtype=np.float32))


# ----------------------------------------------------------------------------- tanh soft clip hook

def test_tanh_soft_clip_hook_acts_only_on_quantized_parameters(monkeypatch):
    quant = pytest.importorskip("nanoq4.quant")
    calls = []
    original = quant.tanh_soft_clip_

    def spy(w, alpha):
        calls.append((w, alpha))
        original(w, alpha)

    monkeypatch.setattr(quant, "tanh_soft_clip_", spy)
    quantized, plain = param([5.0, -4.0, 0.1]), param([5.0, -4.0, 0.1])
    quantized.quantized = True
    opt = optim.SGD([quantized, plain], lr=0.0)
    opt.add_post_step_hook(optim.TanhSoftClip(alpha=3.0))
    for p in (quantized, plain):
        p.grad = np.zeros(3, dtype=np.float32)
    opt.step()
    expected = [3.0 * math.tanh(5.0 / 3.0), 3.0 * math.tanh(-4.0 / 3.0), 3.0 * math.tanh(0.1 / 3.0)]
    np.testing.assert_allclose(quantized.data, expected, rtol=1e-6)
    np.testing.assert_array_equal(plain.data, np.array([5.0, -4.0, 0.1], dtype=np.float32))
    assert len(calls) == 1 and calls[0][0] is quantized.data and calls[0][1] == 3.0


def test_tanh_soft_clip_hook_relative_alpha():
    pytest.importorskip("nanoq4.quant")
    p = param([0.3, -0.4, 0.0, 1.2])
    p.quantized = True
    opt = optim.SGD([p], lr=0.0)
    opt.add_post_step_hook(optim.TanhSoftClip(relative_k=2.0))
    p.grad = np.zeros(4, dtype=np.float32)
    opt.step()
    rms = math.sqrt((0.09 + 0.16 + 0.0 + 1.44) / 4)
    a = 2.0 * rms
    np.testing.assert_allclose(p.data, [a * math.tanh(v / a) for v in (0.3, -0.4, 0.0, 1.2)], rtol=1e-5)


# ----------------------------------------------------------------------------- schedules

def test_cosine_schedule_with_warmup_endpoints():
    lr = optim.cosine_schedule(1.0, total_steps=110, warmup_steps=10, final_lr=0.01)
    assert lr(0) == pytest.approx(0.1)        # first warm-up step: base / warmup
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)        # warm-up reaches the base rate
    assert lr(10) == pytest.approx(1.0)       # cosine starts at the base rate
    assert lr(60) == pytest.approx(0.505)     # halfway: mean of base and final
    assert lr(110) == pytest.approx(0.01)
    assert lr(500) == pytest.approx(0.01)     # stays at the final rate
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine part must not increase"


def test_cosine_schedule_without_warmup_starts_at_base():
    lr = optim.cosine_schedule(0.4, total_steps=100)
    assert lr(0) == pytest.approx(0.4)
    assert lr(50) == pytest.approx(0.2)
    assert lr(100) == pytest.approx(0.0, abs=1e-12)


def test_one_cycle_schedule_endpoints():
    lr = optim.one_cycle_schedule(2.0, total_steps=100, warmup_steps=20)
    assert lr(0) == pytest.approx(0.1)
    assert lr(19) == pytest.approx(2.0)
    assert lr(20) == pytest.approx(2.0)
    assert lr(60) == pytest.approx(1.0)
    assert lr(100) == pytest.approx(0.0)
    assert lr(130) == 0.0


def test_step_schedule():
    lr = optim.step_schedule(1.0, step_size=30, gamma=0.1)
    assert [lr(0), lr(29), lr(30), lr(59), lr(60)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_constant_schedule():
    lr = optim.constant_schedule(0.3)
    assert lr(0) == lr(10 ** 6) == 0.3


# ----------------------------------------------------------------------------- weight averaging (Lookahead)

def test_lookahead_decay_ramps_up_as_the_cube_of_the_run_s_progress():
    # decay_per_step ** every * (step / total) ** 3: 0.5 ** 2 = 0.25, times 1/8 halfway, times 1 at the end
    assert optim.lookahead_decay(2, total_steps=4, every=2, decay_per_step=0.5) == 0.03125
    assert optim.lookahead_decay(4, total_steps=4, every=2, decay_per_step=0.5) == 0.25
    # airbench: every 5 steps at 0.95 per step keeps 0.95 ** 5 = 0.7737809375 of the slow copy at the end
    assert optim.lookahead_decay(100, 100, 5, 0.95) == pytest.approx(0.7737809375, rel=1e-15)
    assert optim.lookahead_decay(10, 100, 5, 0.95) == pytest.approx(0.7737809375e-3, rel=1e-12)


def averaged_model():
    """Linear(2 -> 1) + BatchNorm1d(1): weights, biases, batch-norm affine and running statistics."""
    return nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))


def set_state(model, weight, bias, gamma, beta, mean, var):
    for target, value in zip((model[0].weight.data, model[0].bias.data, model[1].weight.data, model[1].bias.data,
                              model[1].running_mean, model[1].running_var), (weight, bias, gamma, beta, mean, var)):
        target[...] = value


def test_lookahead_sync_averages_every_parameter_and_statistic_then_continues_from_the_average():
    # every 2 steps, 0.5 per step, 4 steps: the first sync (step 2) takes the slow copy; step 3 is no
    # sync; the sync after step 4 keeps 0.5 ** 2 * (4/4) ** 3 = 0.25 of the slow copy:
    #   weight 0.25*[1, -2] + 0.75*[3, 2] = [2.5, 1];  bias 0.25*0.5 + 0.75*(-0.5) = -0.25
    #   gamma 0.25*1 + 0.75*2 = 1.75;  beta 0.75*4 = 3;  mean 0.75*8 = 6;  var 0.25*1 + 0.75*5 = 4
    model = averaged_model()
    lookahead = optim.Lookahead(model, every=2, decay_per_step=0.5, total_steps=4)
    set_state(model, [[1.0, -2.0]], [0.5], [1.0], [0.0], [0.0], [1.0])
    lookahead.after_step(1)
    assert lookahead.slow is None, "no sync after step 1"
    lookahead.after_step(2)
    set_state(model, [[3.0, 2.0]], [-0.5], [2.0], [4.0], [8.0], [5.0])
    lookahead.after_step(3)
    np.testing.assert_array_equal(model[0].weight.data, [[3.0, 2.0]], err_msg="step 3 is no sync")
    lookahead.after_step(4)
    expected = {"layers.0.weight": [[2.5, 1.0]], "layers.0.bias": [-0.25], "layers.1.weight": [1.75],
                "layers.1.bias": [3.0], "layers.1.running_mean": [6.0], "layers.1.running_var": [4.0]}
    assert list(lookahead.slow) == list(expected)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(lookahead.slow[name], expected[name], err_msg=f"slow copy of {name}")
        np.testing.assert_array_equal(value, expected[name], err_msg=f"{name} does not go on from the average")
        assert value.dtype == np.float32


def test_lookahead_write_back_puts_the_slow_copy_into_the_model():
    model = averaged_model()
    lookahead = optim.Lookahead(model, every=1, decay_per_step=0.5, total_steps=10)
    set_state(model, [[1.0, -2.0]], [0.5], [1.0], [0.0], [0.0], [1.0])
    lookahead.after_step(1)
    set_state(model, [[3.0, 2.0]], [-0.5], [2.0], [4.0], [8.0], [5.0])  # trained on past the last sync
    lookahead.write_back()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, lookahead.slow[name], err_msg=name)
    np.testing.assert_array_equal(model[0].weight.data, [[1.0, -2.0]])


def test_lookahead_keeps_tanh_clipped_weights_within_alpha():
    """A slow copy at the clip's bound (a * tanh rounds to a) averaged with weights at it and one float32
    ulp below it, at many decays: never above a (a float32 decay * slow + (1 - decay) * fast often is)."""
    quant = pytest.importorskip("nanoq4.quant")
    alpha = 3.0
    model = nn.Sequential(nn.Linear(64, 1, bias=False))
    w = model[0].weight.data
    below = np.nextafter(np.float32(alpha), np.float32(0))
    for decay in np.random.default_rng(0).random(200):
        w[...] = 100.0
        quant.tanh_soft_clip_(w, alpha)
        assert np.all(w == np.float32(alpha))
        lookahead = optim.Lookahead(model, every=1, decay_per_step=0.5, total_steps=1)
        lookahead.after_step(1)  # the slow copy: every weight at alpha
        w[0, ::2] = below  # the trained weights: half at alpha, half just below
        lookahead.sync(float(decay))
        assert np.abs(w).max() <= alpha, f"decay {decay}: {np.abs(w).max()!r} > {alpha}"


def test_lookahead_state_round_trips_and_refuses_another_model():
    model = averaged_model()
    lookahead = optim.Lookahead(model, every=1, decay_per_step=0.5, total_steps=4)
    assert lookahead.state_dict() is None
    lookahead.after_step(1)
    saved = lookahead.state_dict()
    saved_copy = {k: v.copy() for k, v in saved.items()}
    model[0].weight.data += 1.0
    lookahead.after_step(2)
    assert all(np.array_equal(saved[k], saved_copy[k]) for k in saved), "the saved state must own its arrays"
    other = optim.Lookahead(averaged_model(), every=1, decay_per_step=0.5, total_steps=4)
    other.load_state_dict(lookahead.state_dict())
    assert all(np.array_equal(other.slow[k], lookahead.slow[k]) for k in saved)
    other.load_state_dict(None)
    assert other.slow is None
    with pytest.raises(ValueError, match="averaged weights do not match"):
        optim.Lookahead(nn.Sequential(nn.Linear(3, 1)), 1, 0.5, 4).load_state_dict(saved)
