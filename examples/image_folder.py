"""Few-shot classification on your own image folders.

Shows: ``mamlkit.data.load_folder`` reads ``root/CLASS/*.png|jpg|...`` (any size and mode,
converted and resized, cached after the first read) and splits the classes into train, val and
test (64/16/20 % by default, or a split file); ``split_images`` gives a split as a tensor that
``FewShotTasks`` samples N-way K-shot tasks from; ``conv4`` is MiniImagenet's network sized by
the images. The script meta-trains on the train classes and reports test accuracy before and
after adaptation on new classes. The same run through the command line (with validation,
checkpoints and ``mamlkit eval``) is ``mamlkit train folder-5way-1shot --set data.root=ROOT``.

    python examples/image_folder.py --root /path/to/images   # your folder: ~8 minutes on a CPU at 84x84
    python examples/image_folder.py                          # a generated folder of 40 classes, ~2 minutes
    python examples/image_folder.py --quick                  # a tiny generated folder, a few seconds
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mamlkit import MAML
from mamlkit.data import load_folder
from mamlkit.models import ADAPT_ALL_BUT_NORM, conv4
from mamlkit.tasks import FewShotTasks


def make_demo_folder(root: Path, n_classes: int, per_class: int, side: int) -> Path:
    """Classes of noisy copies of one random colour pattern each: a stand-in for your images."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        pattern = rng.integers(0, 256, (4, 4, 3)).repeat(side // 4, 0).repeat(side // 4, 1)
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy = np.clip(pattern + rng.normal(0, 40, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"class_{c:03d}" / f"{i:02d}.png")
    return root


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="your folder of class folders (default: a generated one)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny images, few iterations")
    parser.add_argument("--image-size", type=int, help="side after resizing (default 84; generated: 32, --quick: 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mamlkit-folder-") as tmp:  # the generated folder, deleted at exit
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    n_way, k_shot, q_query = 5, 1, 3
    iterations, test_tasks = (10, 20) if args.quick else (1000, 600)
    size = args.image_size or (16 if args.quick else 84 if args.root else 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    root, cache_dir = args.root, None  # None: $MAMLKIT_CACHE_DIR or ~/.cache/mamlkit
    if root is None:
        root, cache_dir = make_demo_folder(tmp / "images", 30 if args.quick else 40, 8, 16), tmp / "cache"
        print(f"generated a demo folder: {root}")

    data = load_folder(root, image_size=size, channels=3, cache_dir=cache_dir)
    print(f"{len(data.classes)} classes; " + ", ".join(f"{s}: {len(c)}" for s, c in data.splits.items()))
    # The sampler draws from uint8 images on the device and scales each batch to [0, 1].
    need = {"min_per_class": k_shot + q_query, "min_classes": n_way}
    train = FewShotTasks(data.split_images("train", **need).to(device), n_way, k_shot, q_query, scale=1 / 255)
    test = FewShotTasks(data.split_images("test", **need).to(device), n_way, k_shot, q_query, scale=1 / 255)

    # adapt: BatchNorm's shift is meta-learned but not adapted, as in the official code.
    model = conv4(n_way, in_channels=3, image_size=size).to(device)
    maml = MAML(model, F.cross_entropy, inner_lr=0.1, adapt=ADAPT_ALL_BUT_NORM)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    g = torch.Generator(device).manual_seed(0)  # tasks are drawn on the images' device
    for it in range(1, iterations + 1):
        loss = maml.meta_loss(train.batch(4, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % max(iterations // 5, 1) == 0:
            print(f"iteration {it}: meta-loss {loss.item():.3f}")

    batch = test.batch(test_tasks, torch.Generator(device).manual_seed(1))
    acc = 100 * maml.adaptation_curve(batch, steps=5, metrics={"acc": accuracy})["acc"].mean(0)
    print(f"new classes, {n_way}-way {k_shot}-shot: accuracy {acc[0]:.1f}% unadapted, {acc[-1]:.1f}% after 5 steps")
    print(f"RESULT before={acc[0].item():.2f} after={acc[-1].item():.2f}")


if __name__ == "__main__":
    main()
