"""Test-wide settings: the suite multiplies tiny matrices, where one thread beats two (no thread
hand-off per op), and it must run on a 2-core CI machine."""

import torch

torch.set_num_threads(1)
