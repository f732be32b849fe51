"""Reinforcement learning for MAML (paper Section 5.3): task environments, Gaussian policies,
a batched torch sampler, a linear feature baseline and TRPO through the inner update."""
