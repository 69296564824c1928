"""Shared test set-up: one thread (the tiny models here are faster without intra-op threading)."""

import torch

torch.set_num_threads(1)
