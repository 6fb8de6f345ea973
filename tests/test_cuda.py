"""The CUDA paths agree with the CPU ones. Skipped on machines without a GPU (such as CI's);
run on a GPU machine with: python -m pytest -q tests/test_cuda.py"""
import pytest
import torch

import model
import utils
from priors import create_priors
from test_model import random_boxes, random_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_loss_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    priors = create_priors()
    boxes, labels = random_targets(8, 6, g)
    locs = torch.randn(8, 8732, 4, generator=g)
    scores = 3 * torch.randn(8, 8732, 6, generator=g)
    cpu = model.MultiBoxLoss(priors)(locs, scores, boxes, labels)
    gpu = model.MultiBoxLoss(priors.cuda())(locs.cuda(), scores.cuda(),
                                            [b.cuda() for b in boxes], [lab.cuda() for lab in labels])
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), rtol=1e-4), (cpu, gpu)


def test_detect_objects_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(1)
    priors = create_priors()
    locs = 0.5 * torch.randn(4, 8732, 4, generator=g)
    scores = torch.randn(4, 8732, 5, generator=g)
    cpu = model.detect_objects(locs, scores, priors, 0.01, 0.45, 200)
    gpu = model.detect_objects(locs.cuda(), scores.cuda(), priors.cuda(), 0.01, 0.45, 200)
    for c, d in zip(cpu, gpu):
        for a, b in zip(c, d):
            assert a.shape == b.shape
            assert torch.allclose(a.float(), b.cpu().float(), atol=1e-5)


def test_greedy_nms_on_cuda_equals_torchvision():
    g = torch.Generator().manual_seed(2)
    boxes = torch.stack([random_boxes(300, g, 0.05, 0.4) for _ in range(40)]).cuda()
    scores = torch.rand(40, 300, generator=g).sort(dim=1, descending=True).values.cuda()
    keep = utils.greedy_nms(boxes, scores > 0.1, 0.45)
    for i in range(40):
        idx = (scores[i] > 0.1).nonzero().flatten()
        want = torch.ops.torchvision.nms(boxes[i, idx], scores[i, idx], 0.45)
        assert keep[i].nonzero().flatten().tolist() == sorted(idx[want].tolist())


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    net = model.SSD(21).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 300, 300, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        locs32, scores32 = net(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            locs16, scores16 = net(x)
    for a, b in ((locs32, locs16), (scores32, scores16)):
        assert torch.isfinite(b).all()
        assert (a - b.float()).norm() / a.norm() < 3e-2


def test_gpu_augment_on_cuda_makes_the_cpu_paths_samples(shapes_lists):
    """render_batch on CUDA (nvJPEG) against the PIL path. nvJPEG's IDCT and chroma upsampling
    are not libjpeg-turbo's, so the pixels may differ by a level or two, but not more on average."""
    import datasets
    import gpu_augment
    cpu = datasets.PascalVOCDataset(shapes_lists, "train")
    device = datasets.PascalVOCDataset(shapes_lists, "train", decode="device")
    batch = gpu_augment.render_batch(datasets.collate_fn([device[i] for i in range(16)]),
                                     torch.device("cuda"), torch.channels_last)
    expected = datasets.collate_fn([cpu[i] for i in range(16)])
    assert batch.images.is_cuda and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(batch.boxes, expected.boxes))
    std = torch.tensor(datasets.IMAGENET_STD).view(1, 3, 1, 1) * 255
    levels = (batch.images.cpu() - expected.images).abs() * std                # 0-255 units
    assert levels.mean() < 1.0, levels.mean(dim=(1, 2, 3))


def test_making_samples_on_cuda_does_not_wait_for_it(shapes_lists):
    """Everything --gpu-augment does after decoding is queued without a host synchronisation
    (none raises under sync debug mode "error"), so the host makes the next batch while the
    GPU still runs the last step."""
    import datasets
    import gpu_augment
    for split in ("train", "test"):
        dataset = datasets.PascalVOCDataset(shapes_lists, split, decode="device")
        pending = [dataset[i][0] for i in range(16)]
        decoded, problems = gpu_augment.decode(pending, torch.device("cuda"))
        assert not problems
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            images = gpu_augment.make_samples(decoded, pending, torch.device("cuda"), torch.channels_last)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert images.shape == (16, 3, 300, 300) and torch.isfinite(images).all()
