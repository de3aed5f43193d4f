import pytest
import torch

# Tiny models run fastest single-threaded, and stay fast when other work shares the CPU.
torch.set_num_threads(1)


@pytest.fixture
def tiny_pipe():
    from stepcache.integrations.models import tiny_dit_pipeline

    return tiny_dit_pipeline(num_layers=3)


@pytest.fixture
def plain_dit():
    from tests._helpers.plain_models import PlainDiT

    torch.manual_seed(0)
    return PlainDiT().eval()
