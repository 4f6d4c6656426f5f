"""End to end: a small CNN built from nanoq4 modules learns a synthetic image task.

Four classes of 16x16 NHWC float32 images, generated here: horizontal stripes, vertical stripes,
diagonal stripes, and a coloured blob on a flat background; every image gets a random period,
phase, tint and strong Gaussian noise (std 2), so no single pixel gives the class away.
"""
import numpy as np

from nanoq4 import nn, ops, optim
from nanoq4.tensor import Tensor, no_grad

SIZE, CLASSES, NOISE = 16, 4, 2.0  # noise std against a signal of amplitude ~1


def synthetic_images(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        period, phase = rng.uniform(3.0, 6.0), rng.uniform(0, 2 * np.pi)
        coordinate = [yy, xx, (yy + xx) / np.sqrt(2)][label] if label < 3 else None
        if coordinate is not None:
            pattern = np.sin(2 * np.pi * coordinate / period + phase)
        else:
            cy, cx, radius = rng.uniform(4, 12), rng.uniform(4, 12), rng.uniform(2.0, 4.0)
            pattern = 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2)) - 0.5
        tint = rng.uniform(0.5, 1.5, size=3)
        images[i] = pattern[:, :, None] * tint + rng.normal(0.0, NOISE, size=(SIZE, SIZE, 3))
    return images, labels


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),                                  # 16x16 -> 8x8
        nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32, relu=True),                    # fused BN + ReLU
        nn.MaxPool2d(2),                                  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(4 * 4 * 32, CLASSES),
    )


def accuracy(model, images, labels):
    model.eval()
    with no_grad():
        predictions = model(Tensor(images)).data.argmax(axis=1)
    model.train()
    return float((predictions == labels).mean())


def test_small_cnn_learns_synthetic_orientations():
    nn.manual_seed(0)
    train_x, train_y = synthetic_images(512, seed=1)
    test_x, test_y = synthetic_images(256, seed=2)
    model = small_cnn()
    epochs, batch = 5, 32
    steps_per_epoch = len(train_x) // batch
    schedule = optim.cosine_schedule(0.05, epochs * steps_per_epoch, warmup_steps=steps_per_epoch)
    opt = optim.SGD(optim.param_groups(model, 5e-4), lr=schedule(0), momentum=0.9, nesterov=True)
    rng = np.random.default_rng(3)
    epoch_losses = []
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(train_x))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            loss = ops.cross_entropy(model(Tensor(train_x[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.lr = schedule(step)
            opt.step()
            losses.append(loss.item())
            step += 1
        epoch_losses.append(float(np.mean(losses)))

    assert all(np.isfinite(epoch_losses)), epoch_losses
    assert epoch_losses[-1] < 0.25 * epoch_losses[0], f"loss did not fall enough: {epoch_losses}"
    train_accuracy = accuracy(model, train_x, train_y)
    test_accuracy = accuracy(model, test_x, test_y)
    assert train_accuracy > 0.9, f"train accuracy {train_accuracy:.3f}, losses {epoch_losses}"
    assert test_accuracy > 0.85, f"held-out accuracy {test_accuracy:.3f}"
