"""Optimizers (SGD with momentum/Nesterov, AdamW), gradient-norm clipping, post-step hooks
(the paper's tanh soft clip of quantized weights plugs in here), learning-rate schedules
as plain functions of the step, and Lookahead weight averaging.

Parameter groups are dicts {"params": [...], "weight_decay": float}; `param_groups` builds the
usual two: weights with decay, biases and BatchNorm parameters (1-D tensors) without.
"""
import copy
import math

import numpy as np

from . import kernels, profile, quant


def param_groups(model, weight_decay):
    """Decay only tensors with more than one dimension (conv/linear weights)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before."""
    with profile.timed("clip_grad_norm"):
        grads = [p.grad for p in params if p.grad is not None]
        total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
        if total > max_norm:
            factor = max_norm / (total + 1e-6)
            for g in grads:
                g *= g.dtype.type(factor)
    return total


class Optimizer:
    def __init__(self, params, lr, weight_decay=0.0):
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params, "weight_decay": weight_decay}]
        self.groups = params
        self.lr = lr
        self.step_count = 0
        self.post_step_hooks = []
        self.state = [[None for _ in g["params"]] for g in self.groups]

    def parameters(self):
        return [p for g in self.groups for p in g["params"]]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def add_post_step_hook(self, hook):
        """hook(optimizer) runs after every step, e.g. the tanh soft clip of quantized weights."""
        self.post_step_hooks.append(hook)

    def step(self):
        self.step_count += 1
        with profile.timed(type(self).__name__ + ".step"):
            for gi, group in enumerate(self.groups):
                for pi, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self.state[gi][pi] = self.update(p.data, p.grad, self.state[gi][pi], group["weight_decay"])
        for hook in self.post_step_hooks:
            with profile.timed(type(hook).__name__):
                hook(self)

    def update(self, w, grad, state, weight_decay):
        raise NotImplementedError

    def state_dict(self):
        return {"step_count": self.step_count, "lr": self.lr, "state": _copy_state(self.state)}

    def load_state_dict(self, state):
        expected = [len(g["params"]) for g in self.groups]
        if [len(g) for g in state["state"]] != expected:
            raise ValueError("optimizer state does not match the parameter groups")
        self.step_count, self.lr, self.state = state["step_count"], state["lr"], _copy_state(state["state"])


def _copy_state(state):
    """Per-parameter buffers are updated in place: a saved or loaded state must own its arrays."""
    return copy.deepcopy(state)


class SGD(Optimizer):
    """PyTorch's SGD: g = grad + wd*w; buf = momentum*buf + g (buf = g at first);
    step = g + momentum*buf with Nesterov, else buf; w -= lr * step."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum, self.nesterov = momentum, nesterov

    def update(self, w, grad, buf, weight_decay):
        first = buf is None
        if first:
            buf = np.empty_like(w)
        kernels.sgd_update(w, grad, buf, self.lr, self.momentum, self.nesterov, weight_decay, first)
        return buf


class AdamW(Optimizer):
    """Adam with decoupled weight decay: w *= 1 - lr*wd, then the bias-corrected Adam step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, weight_decay)
        self.betas, self.eps = betas, eps

    def update(self, w, grad, state, weight_decay):
        # State (m, v, t): t counts this parameter's own updates, so one that missed some steps
        # (no gradient) is bias-corrected for the moments it really has, as in PyTorch.
        if state is None:
            state = (np.zeros_like(w), np.zeros_like(w), 0)
        m, v, t = state if len(state) == 3 else (*state, self.step_count - 1)  # 2-tuples: older checkpoints
        kernels.adamw_update(w, grad, m, v, self.lr, self.betas[0], self.betas[1], self.eps, weight_decay, t + 1)
        return m, v, t + 1


class TanhSoftClip:
    """Post-step hook: W <- a * tanh(W / a) on every quantized weight (the paper's a = 3.0).

    With `relative_k` set, a = k * RMS(W) per tensor instead: He-initialised weights are ~0.05,
    where 3 * tanh(W / 3) is almost the identity, so a scale-relative a is what actually bounds
    outliers and keeps the 4-bit grid well used.
    """

    def __init__(self, alpha=3.0, relative_k=None):
        self.alpha, self.relative_k = alpha, relative_k

    def __call__(self, optimizer):
        for p in optimizer.parameters():
            if getattr(p, "quantized", False):
                a = quant.rms_alpha(p.data, self.relative_k) if self.relative_k else self.alpha
                quant.tanh_soft_clip_(p.data, a)


# ----------------------------------------------------------------------------- weight averaging

LOOKAHEAD_RAMP = 3  # the decay grows as (step / total steps) ** 3: early weights are soon forgotten


def lookahead_decay(step, total_steps, every, decay_per_step):
    """airbench's schedule: the share of the slow copy kept at the sync after `step` steps,
    decay_per_step ** every (the per-step decay over the steps since the last sync) times
    (step / total_steps) ** 3: almost no averaging early on, decay_per_step ** every at the end."""
    return decay_per_step ** every * (step / total_steps) ** LOOKAHEAD_RAMP


class Lookahead:
    """Weight averaging as airbench does it (Lookahead, Zhang et al. 2019, with a ramped decay): every
    `every` steps a slow copy of the model's state moves towards the trained ("fast") weights,
    slow <- decay * slow + (1 - decay) * fast with decay = lookahead_decay(step, ...), and the fast
    weights are set to it; write_back() puts the slow copy into the model for good.

    The state is every parameter (the latent float weights that each forward fake-quantizes, biases,
    batch-norm affine) and every buffer (batch-norm running statistics), by state-dict name. The slow
    copy starts as the state after the first `every` steps (airbench starts it at the initial weights,
    which its first sync, at decay ~ (every/total)^3, all but forgets); so every value it ever averages
    has been through the optimizer's post-step hooks.

    Tanh soft clip: each sync makes every element a convex combination of two values bounded by alpha
    (|w| <= alpha after each step's clip), so |w| <= alpha still holds; the combination is computed in
    float64 and rounded to float32 once, and that rounding cannot carry it past the larger of the two
    float32 magnitudes (float64's error is far below half a float32 ulp). The clip is not applied
    again: it is not idempotent (a*tanh(w/a) < w for w > 0), so an extra pass would shrink the weights
    at every sync and the model would no longer hold the average. (With a relative alpha, k * RMS per
    tensor, the bound moves with the weights and the hook sets it anew at every step: there is no
    bound between steps to keep.)

    The optimizer's momentum buffers are left alone, as airbench does: they estimate the recent
    gradient direction, which still holds at the nearby slow point, and resetting them would restart
    the momentum's warm-up after every sync."""

    def __init__(self, model, every, decay_per_step, total_steps):
        self.model, self.every, self.decay_per_step, self.total_steps = model, every, decay_per_step, total_steps
        self.slow = None  # name -> float32 array, from the first sync on

    def after_step(self, step):
        """Call after the optimizer's `step`-th step (counted from 1 over the run)."""
        if step % self.every == 0:
            self.sync(lookahead_decay(step, self.total_steps, self.every, self.decay_per_step))

    def sync(self, decay):
        """slow <- decay * slow + (1 - decay) * fast, then fast <- slow; the first sync only takes the copy."""
        fast = self.model.state_dict()
        if self.slow is None:
            self.slow = fast
            return
        for name, slow in self.slow.items():
            slow[...] = decay * slow.astype(np.float64) + (1.0 - decay) * fast[name].astype(np.float64)
        self.model.load_state_dict(self.slow)

    def write_back(self):
        """The model's state becomes the slow copy (the averaged weights); nothing before the first sync."""
        if self.slow is not None:
            self.model.load_state_dict(self.slow)

    def state_dict(self):
        """The slow copy (copies of its arrays) or None before the first sync."""
        return None if self.slow is None else {name: a.copy() for name, a in self.slow.items()}

    def load_state_dict(self, state):
        """A slow copy saved by state_dict (None: none yet), refused when it does not fit the model."""
        if state is None:
            self.slow = None
            return
        fast = self.model.state_dict()
        if list(state) != list(fast) or any(np.shape(state[k]) != fast[k].shape for k in fast):
            raise ValueError("the averaged weights do not match the model")
        self.slow = {name: np.array(state[name], dtype=fast[name].dtype) for name in fast}


# ----------------------------------------------------------------------------- schedules

def constant_schedule(base_lr):
    return lambda step: base_lr


def cosine_schedule(base_lr, total_steps, warmup_steps=0, final_lr=0.0):
    """Linear warm-up from 0 over warmup_steps, then cosine decay to final_lr at total_steps."""
    def lr(step):
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def one_cycle_schedule(base_lr, total_steps, warmup_steps):
    """Linear warm-up to base_lr, then linear decay to zero at total_steps (triangular one-cycle)."""
    def lr(step):
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return lr


def step_schedule(base_lr, step_size, gamma=0.1):
    """Multiply the rate by gamma every step_size steps."""
    return lambda step: base_lr * gamma ** (step // step_size)
