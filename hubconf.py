"""torch.hub entry points: this repository's SSD networks, ready for detect.detect.

    import torch
    net = torch.hub.load("OWNER/REPO", "ssd300", checkpoint="checkpoints/toy/checkpoint.pt")
    net = torch.hub.load("OWNER/REPO", "ssd300_coco")      # torchvision's COCO SSD300, converted

    from PIL import Image
    from detect import detect, draw_detections            # importable once torch.hub has the code
    image = Image.open("photo.jpg").convert("RGB")
    boxes, labels, scores = detect(net, image)            # pixels, label indices, scores
    draw_detections(image, boxes, labels, scores, net.label_map).save("detections.png")

(OWNER/REPO: where this repository lives on GitHub; a local clone works with source="local".)
Each network comes in eval mode on the CPU (net.to("cuda") moves it), and carries `label_map`
(class name -> index) beside its config: its priors, and the input its weights expect
(size, normalisation and resize), which detect follows.
"""
dependencies = ["torch", "torchvision", "numpy", "PIL"]


def ssd300(checkpoint):
    """An SSD from a checkpoint of this repository (train.py's, or convert_weights.py's): SSD300
    or SSD512, either base, as the checkpoint records."""
    from model import load_checkpoint
    net, saved = load_checkpoint(checkpoint)
    net.label_map = saved["config"]["label_map"]
    return net


def ssd300_coco(weights=None):
    """torchvision's COCO-trained SSD300-VGG16 (SSD300_VGG16_Weights.COCO_V1, COCO AP 25.1 as
    torchvision reports it), downloaded and cached through torchvision's weights API, or read
    from `weights`, a file of its state dict; converted as convert_weights.py does (COCO's
    80 classes at torchvision's indices; torchvision's input: its normalisation and resize)."""
    import torchvision

    from convert_weights import LAYOUTS, convert, read_state_dict
    from model import network_of
    state = read_state_dict(weights, torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1)
    checkpoint = convert(state, LAYOUTS["torchvision"])
    net = network_of(checkpoint).eval()
    net.label_map = checkpoint["config"]["label_map"]
    return net
