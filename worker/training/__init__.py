"""Training: one plain PyTorch loop shared by every task kind, plus checkpointing.

Runs inside the spawned training process; this is the only part of Tunehouse that trains.
"""
