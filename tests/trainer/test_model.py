"""--pretrained: local state dicts only, with clear messages for the wrong file."""

import pytest
import torch
from torchvision.models import resnet18, resnet50

from screener.errors import UserError
from trainer.model import build_classifier, load_pretrained


def test_random_init_recorded():
    _, info = build_classifier(None)
    assert info.source == "random-init"


def test_local_resnet50_state_dict_loads(tmp_path):
    p = tmp_path / "r50.pth"
    torch.save(resnet50(weights=None).state_dict(), p)
    model, info = build_classifier(p)
    assert info.source == "r50.pth" and len(info.sha256) == 64


@pytest.mark.parametrize("content", ["resnet18", "garbage", "missing"])
def test_wrong_files_are_user_errors(tmp_path, content):
    p = tmp_path / "w.pth"
    if content == "resnet18":
        torch.save(resnet18(weights=None).state_dict(), p)
    elif content == "garbage":
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="--pretrained"):
        load_pretrained(resnet50(weights=None), p)
