"""N-way K-shot classification episodes drawn from a class-grouped image tensor (Omniglot, MiniImagenet)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine import TaskBatch


class FewShotTasks:
    """Episodes of ``n_way`` classes with ``k_shot`` support and ``q_query`` query images each.

    Args:
        images: ``[n_classes, n_per_class, H, W]`` or ``[n_classes, n_per_class, C, H, W]``, float or
            uint8, already on the training device; it is indexed, not copied (unless it is
            non-contiguous or ``rotate`` is set, then once).
        n_way, k_shot, q_query: classes per task, support and query images per class.
        rotate: rotate every image of a class in a task by the same random multiple of 90°
            (Omniglot's class augmentation: a rotated character is a new class). Keeps 4 rotated
            copies of ``images`` on the device.
        scale: multiplies the images after the float conversion (``1/255`` for uint8 MiniImagenet),
            done per batch so the dataset can stay uint8 on the device.

    Everything a batch needs is drawn from the caller's generator on the images' device, so a
    seed gives the same tasks on the same device (CPU and CUDA streams differ).
    """

    def __init__(
        self,
        images: Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        *,
        rotate: bool = False,
        scale: float | None = None,
    ):
        if images.dim() == 4:
            images = images.unsqueeze(2)
        if images.dim() != 5:
            raise ValueError(f"images must be [classes, per_class, (C,) H, W], got shape {tuple(images.shape)}")
        n_classes, n_per_class, channels, height, width = images.shape
        if n_way < 1 or k_shot < 1 or q_query < 1:
            raise ValueError(f"n_way, k_shot and q_query must be >= 1, got {n_way}, {k_shot}, {q_query}")
        if n_way > n_classes:
            raise ValueError(f"{n_way}-way tasks need {n_way} distinct classes but the images hold {n_classes}")
        if k_shot + q_query > n_per_class:
            raise ValueError(
                f"k_shot + q_query = {k_shot} + {q_query} images per class, drawn without replacement, "
                f"but each class has {n_per_class}"
            )
        if rotate and height != width:
            raise ValueError(f"rotate needs square images, got {height}x{width}")
        self.images = images
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.rotate = rotate
        self.scale = scale
        self.n_classes, self.n_per_class = n_classes, n_per_class
        self.image_shape = (channels, height, width)
        if rotate:
            # The 4 rotated copies of the dataset, made once: a batch then picks (rotation, class,
            # example) rows with a single index_select, so rotating costs nothing per batch. Rotating
            # each batch instead (a gather with a per-row pixel permutation) was much slower
            # (BENCHMARKS.md, "Measurements behind design choices"); the price is 4x the dataset's
            # device memory (~0.3 GB for Omniglot's 1100 training characters in float32).
            images = torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)])
        self._flat = images.reshape(-1, channels, height, width)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def batch(self, n_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``n_tasks`` episodes: inputs ``[T, N*K or N*Q, C, H, W]`` float32, targets int64 in ``0..N-1``.

        Examples are grouped by class slot (slot-major); the label of slot ``i`` is a random
        permutation of ``0..N-1``, different in every task.
        """
        if generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device} but the images are on {self.device}")
        n, k, q, dev = self.n_way, self.k_shot, self.q_query, self.device
        # The top-m indices of i.i.d. uniforms are a uniform random m-subset in random order, batched
        # over tasks: distinct classes per task, distinct examples per class (support ∩ query = ∅).
        # topk rather than a full argsort, which sorts every class only to keep N of them.
        classes = torch.rand(n_tasks, self.n_classes, generator=generator, device=dev).topk(n, dim=1).indices
        examples = torch.rand(n_tasks, n, self.n_per_class, generator=generator, device=dev).topk(k + q, dim=2).indices
        labels = torch.rand(n_tasks, n, generator=generator, device=dev).argsort(dim=1)

        index = classes.unsqueeze(-1) * self.n_per_class + examples  # [T, N, K+Q] rows of the flat view
        if self.rotate:
            turns = torch.randint(0, 4, (n_tasks, n, 1), generator=generator, device=dev)
            index = index + turns * (self.n_classes * self.n_per_class)
        # All support rows first, then all query rows: both halves of the gathered tensor are then
        # contiguous [T, N*K | N*Q, ...] views, with no copy to split them. index_select on the flat
        # view beats advanced indexing with two index tensors by far (BENCHMARKS.md).
        rows = torch.cat([index[..., :k].reshape(-1), index[..., k:].reshape(-1)])
        x = self._flat.index_select(0, rows).float()
        if self.scale is not None:
            x.mul_(self.scale)  # x is always a fresh tensor here (index_select copies)

        n_support = n_tasks * n * k
        return TaskBatch(
            x[:n_support].view(n_tasks, n * k, *self.image_shape),
            labels.repeat_interleave(k, dim=1),
            x[n_support:].view(n_tasks, n * q, *self.image_shape),
            labels.repeat_interleave(q, dim=1),
        )

    def __repr__(self) -> str:
        return (
            f"FewShotTasks({self.n_classes} classes x {self.n_per_class}, {self.n_way}-way {self.k_shot}-shot, "
            f"{self.q_query} query, rotate={self.rotate}, scale={self.scale}, device={self.device})"
        )
