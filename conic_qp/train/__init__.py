"""Training: data readers, importance sampling, losses, augmentation, the loop and tuning.

Submodules are imported explicitly (``from conic_qp.train.data import read_conic``) so that
reading data does not import torch.
"""
