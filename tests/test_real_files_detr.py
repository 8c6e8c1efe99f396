"""DETR folders as the hub published them in the transformers 4.3x-4.4x era load offline in transformers 5.x.

The folder is written here in that era's layout: ``config.json`` as ``DetrConfig.to_dict()`` wrote it then (timm
backbone by name, ``"backbone_config": null``, ``"backbone_kwargs": null``, ``use_pretrained_backbone: true``, the
era's extra fields), weights in the era's names (``model.backbone.conv_encoder.model.*``, attention ``out_proj``,
``fc1``/``fc2`` directly under the layer), ``preprocessor_config.json`` of a ``DetrFeatureExtractor`` (``size``
800, ``max_size`` 1333). Small widths keep it fast; the reference is the in-memory model the tensors came from.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

ID2LABEL = {"0": "N/A", "1": "person", "17": "cat", "18": "dog"}


pytestmark = pytest.mark.usefixtures("one_thread")


def era_config(**arch) -> dict:
    """config.json of a DETR saved by transformers ~4.40 (facebook/detr-resnet-50's fields)."""
    cfg = {"_name_or_path": "facebook/detr-resnet-50", "activation_dropout": 0.0, "activation_function": "relu",
           "architectures": ["DetrForObjectDetection"], "attention_dropout": 0.0, "auxiliary_loss": False,
           "backbone": "resnet50", "backbone_config": None, "backbone_kwargs": None, "bbox_cost": 5,
           "bbox_loss_coefficient": 5, "class_cost": 1, "d_model": 256, "decoder_attention_heads": 8,
           "decoder_ffn_dim": 2048, "decoder_layerdrop": 0.0, "decoder_layers": 6, "dice_loss_coefficient": 1,
           "dilation": False, "dropout": 0.1, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048,
           "encoder_layerdrop": 0.0, "encoder_layers": 6, "eos_coefficient": 0.1, "giou_cost": 2,
           "giou_loss_coefficient": 2, "id2label": ID2LABEL, "init_std": 0.02, "init_xavier_std": 1.0,
           "is_encoder_decoder": True, "label2id": {v: int(k) for k, v in ID2LABEL.items()},
           "mask_loss_coefficient": 1, "max_position_embeddings": 1024, "model_type": "detr", "num_channels": 3,
           "num_hidden_layers": 6, "num_queries": 100, "position_embedding_type": "sine", "scale_embedding": False,
           "torch_dtype": "float32", "transformers_version": "4.40.0.dev0", "use_pretrained_backbone": True,
           "use_timm_backbone": True}
    cfg.update(arch)
    return cfg


TINY = dict(backbone="resnet18", d_model=32, encoder_layers=1, decoder_layers=1, num_hidden_layers=1,
            encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
            num_queries=5)
ERA_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "DetrFeatureExtractor",
                    "format": "coco_detection", "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225], "max_size": 1333, "size": 800}


def to_era_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x weight names -> the names of checkpoints saved by transformers 4.x."""
    out = {}
    for k, v in state.items():
        k = k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        k = k.replace(".o_proj.", ".out_proj.")
        k = re.sub(r"layers\.(\d+)\.mlp\.(fc[12])", r"layers.\1.\2", k)
        out[k] = v.contiguous()
    return out


@pytest.fixture(scope="module")
def era_folder(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import DetrConfig, DetrForObjectDetection

    folder = tmp_path_factory.mktemp("detr_era")
    raw = era_config(**TINY)
    with pytest.raises(AttributeError):  # what transformers 5.x does with the file as published
        DetrConfig.from_dict(raw)
    cfg = DetrConfig.from_dict({k: v for k, v in raw.items() if k not in ("backbone_kwargs", "backbone_config")})
    torch.manual_seed(0)
    model = DetrForObjectDetection(cfg).eval()
    with torch.no_grad():  # a confident head so detections exist at threshold 0
        model.class_labels_classifier.bias.normal_(0, 3)
    save_file(to_era_names(model.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(ERA_PREPROCESSOR, indent=2))
    return folder, model


def test_era_config_with_null_backbone_kwargs_loads_offline(era_folder):
    from transformers import DetrImageProcessor

    from xclip.models.detr import DetrDetector

    folder, ref = era_folder
    det = DetrDetector.from_pretrained(str(folder), ["cat", "dog", "person"], threshold=0.0)
    for (k, v), v2 in zip(ref.state_dict().items(), det.model.state_dict().values()):
        assert torch.equal(v, v2), k  # every era-named tensor reached its 5.x place
    assert det.processor.size.shortest_edge == 800 and det.processor.size.longest_edge == 1333
    img = Image.fromarray((torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    got = det.detect([img])[0]
    proc = DetrImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333})
    with torch.no_grad():
        out = ref(**proc(images=[img], return_tensors="pt"))
    r = proc.post_process_object_detection(out, threshold=0.0, target_sizes=[(48, 64)])[0]
    keep = torch.isin(r["labels"], torch.tensor([1, 17, 18]))
    assert len(got["scores"]) == int(keep.sum()) > 0
    assert torch.allclose(got["scores"], r["scores"][keep], atol=1e-5)
    assert torch.allclose(got["boxes"], r["boxes"][keep], atol=1e-3)


def test_detr_failures_name_the_file_and_the_fix(tmp_path, era_folder, monkeypatch):
    from xclip.models.detr import DetrDetector, DetrLoadError
    from xclip.utils import hub

    folder, _ = era_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(era_config(**{**TINY, "d_model": "wide"})))
    with pytest.raises(DetrLoadError, match=r"(?s)bad/config.json: transformers .* cannot build a DetrConfig.*"
                                            r"local folder holding config.json"):
        DetrDetector.from_pretrained(str(bad), ["cat"])
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DetrLoadError, match=r"(?s)DETR weights of .*bad.*config.json.*could not be loaded"):
        DetrDetector.from_pretrained(str(bad), ["cat"])
    # an HF id neither cached nor reachable, HF_HUB_OFFLINE unset: at once, with the cache path
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_probe_cache", {})
    with pytest.raises(DetrLoadError, match=rf"(?s)not in the HF cache \({tmp_path / 'hub'}\).*unreachable"):
        DetrDetector.from_pretrained("facebook/detr-resnet-50", ["cat"])
