"""The torch runtime on CUDA against the CPU reference: fp32 greedy and beam tokens identical, image by image.

Marked `gpu`: scripts/gpu_check.sh runs them on a lent GPU; everywhere else they skip with the reason.
"""
import pytest
import torch

from clipcap_bench.device_parity import DeviceParityConfig, check_device_parity
from clipcap.captioner import Captioner
from clipcap.decoding import DecodingOptions
from conftest import random_images

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none here")]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cuda_fp32_tokens_equal_cpu_tiny(tiny_bundle, strategy):
    images = random_images(6)
    options = DecodingOptions(strategy=strategy)
    want = Captioner.from_path(tiny_bundle, device="cpu").caption_images(images, options).captions
    got = Captioner.from_path(tiny_bundle, device="cuda").caption_images(images, options).captions
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_cuda_fp32_tokens_equal_cpu_full_size(full_size_bundle):
    report = check_device_parity(DeviceParityConfig(full_size_bundle, device="cuda", max_tokens=20))
    assert report["identical"], report["strategies"]


def test_cuda_batched_equals_one_by_one(tiny_bundle):
    captioner = Captioner.from_path(tiny_bundle, device="cuda")
    images = random_images(5)
    batched = [c.token_ids for c in captioner.caption_images(images).captions]
    assert batched == [captioner.caption_images([image]).captions[0].token_ids for image in images]
