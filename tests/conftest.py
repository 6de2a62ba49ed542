"""Test-session settings shared by every test."""

import os

import torch

# Tests run many tiny tensor operations, often beside server subprocesses on a small machine: one intra-op
# thread per process avoids oversubscribing the cores (two threads made tiny ops ~100x slower under load).
# Subprocesses started by tests (servers, `dskd run`) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
