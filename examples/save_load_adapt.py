"""Save a meta-trained model, load it elsewhere, adapt it to a new task and predict.

Shows: ``MAML`` is an ``nn.Module``, so ``state_dict`` holds everything meta-learned (the
network's weights and, with ``learn_inner_lr=True`` (Meta-SGD), the per-parameter step sizes);
a fresh ``MAML`` around the same architecture loads it with ``load_state_dict``. Then
``adapt(support_x, support_y)`` returns adapted parameters (the loaded model is untouched) and
``maml(x, params)`` predicts with them. ``maml.model.state_dict()`` alone is the plain network,
loadable without mamlkit.

(A run trained with ``mamlkit train`` keeps its weights in ``runs/NAME/checkpoint.pt``;
``mamlkit.experiments.fewshot.load_learner(run_dir)`` and ``mamlkit eval`` read those.)

    python examples/save_load_adapt.py --out /tmp/maml-demo            # ~1 minute on a CPU
    python examples/save_load_adapt.py --quick                          # a few seconds, in a temp dir
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mamlkit import MAML
from mamlkit.tasks import SinusoidTasks


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_learner() -> MAML:
    # The same constructor arguments on both sides: learn_inner_lr decides what state_dict holds.
    return MAML(make_net(), F.mse_loss, inner_lr=0.01, inner_steps=1, learn_inner_lr=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer iterations")
    parser.add_argument("--out", type=Path, help="where to write maml.pt and model.pt (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mamlkit-example-"))
    out.mkdir(parents=True, exist_ok=True)
    iterations = 200 if args.quick else 20000
    torch.manual_seed(0)

    # -- train and save --
    maml, tasks, g = make_learner(), SinusoidTasks(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for _ in range(iterations):
        loss = maml.meta_loss(tasks.batch(10, 10, 10, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(maml.state_dict(), out / "maml.pt")  # weights + learned step sizes
    torch.save(maml.model.state_dict(), out / "model.pt")  # the plain network
    print(f"saved {out / 'maml.pt'} and {out / 'model.pt'}")

    # -- load (in another process, this is where it would start) --
    loaded = make_learner()
    loaded.load_state_dict(torch.load(out / "maml.pt", weights_only=True))
    same = all(torch.equal(a, b) for a, b in zip(maml.state_dict().values(), loaded.state_dict().values()))
    print(f"loaded: {len(loaded.state_dict())} tensors, identical to the saved ones: {same}")
    plain = make_net()
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True))

    # -- adapt to new tasks and predict --
    before, after = [], []
    for x, y, qx, qy in zip(*tasks.batch(50, 10, 100, torch.Generator().manual_seed(123)), strict=True):
        fast = loaded.adapt(x, y)  # as trained: 1 step of the learned step sizes (Meta-SGD)
        with torch.no_grad():
            prediction = loaded(qx, fast)  # [100, 1] at the query points
            before.append(F.mse_loss(plain(qx), qy).item())  # the loaded network, not adapted
            after.append(F.mse_loss(prediction, qy).item())
    before, after = sum(before) / len(before), sum(after) / len(after)
    print(f"50 new tasks: query MSE {before:.4f} before adaptation, {after:.4f} after 1 step")
    print(f"RESULT identical={same} before={before:.6f} after={after:.6f}")


if __name__ == "__main__":
    main()
