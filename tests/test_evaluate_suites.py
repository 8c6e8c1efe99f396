"""The evaluation suites end to end through evaluate.main on generated data (tiny random CLIP)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from xclip import evaluate
from xclip.datamodules.iiit5k import write_iiit5k_folder
from xclip.datamodules.text_render import TextStyle, draw_word

BASE = ["--backbone", "tiny-vit-test", "--device", "cpu"]


def _run(tmp_path, *argv: str) -> dict:
    out = evaluate.main([*BASE, "--out", str(tmp_path / "res.json"), *argv])
    assert json.loads((tmp_path / "res.json").read_text())["suites"]  # written
    return out["suites"]


def _solid(colour, size=40):
    return Image.new("RGB", (size, size), colour)


def test_unknown_suite_lists_valid_suites(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--suite", "nonexistent"])
    assert e.value.code == 2
    msg = capsys.readouterr().err
    assert "nonexistent" in msg
    for s in ("retrieval", "ocr_iiit5k", "typographic", "text_in_image", "saliency_prf", "detection_ap"):
        assert s in msg


# ---- typographic ----------------------------------------------------------------------------------------
def _write_real_typo(root, clean_too=True):
    ann = {}
    for i, (obj, colour) in enumerate([("cup", "red"), ("dog", "blue")]):
        img = _solid(colour, 48)
        (root / "images").mkdir(parents=True, exist_ok=True)
        if clean_too:
            img.save(root / "images" / f"IMG_{i}0.JPG", "JPEG")
            ann[f"IMG_{i}0.JPG"] = {"true object": obj, "typographic attack label": ""}
        draw_word(img, "good", TextStyle(size=12))[0].save(root / "images" / f"IMG_{i}1.JPG", "JPEG")
        ann[f"IMG_{i}1.JPG"] = {"true object": obj, "typographic attack label": "good"}
    (root / "annotations.json").write_text(json.dumps(ann))


def test_typographic_real_layout_runs_and_counts(tmp_path):
    _write_real_typo(tmp_path / "typo")
    r = _run(tmp_path, "--suite", "typographic", "--typographic.source", "real",
             "--typographic.data", str(tmp_path / "typo"))["typographic"]
    assert (r["n_clean"], r["n_attacked"], r["n_candidates"]) == (2, 2, 3)  # cup, dog, good
    for k in ("clean_accuracy", "attacked_accuracy", "attack_success_rate"):
        assert 0.0 <= r[k] <= 1.0
    assert r["accuracy"] == pytest.approx((r["clean_accuracy"] + r["attacked_accuracy"]) / 2)


def test_typographic_errors_name_the_layout(tmp_path):
    (tmp_path / "typo").mkdir()
    with pytest.raises(SystemExit, match="annotations.json"):   # checked before any work
        _run(tmp_path, "--suite", "typographic", "--typographic.source", "real",
             "--typographic.data", str(tmp_path / "typo"))
    with pytest.raises(SystemExit, match="<class name>"):
        _run(tmp_path, "--suite", "typographic", "--typographic.source", "imagefolder",
             "--typographic.data", str(tmp_path / "missing"))


def test_typographic_scoring_oracle_features():
    """Features constructed so clean images read their object and attacked ones read the word."""
    from xclip.datamodules.typographic_real import TypoSample
    from xclip.evaluation.typographic import candidate_set, score_typographic

    samples = [TypoSample(None, "cup", None), TypoSample(None, "cup", "good"), TypoSample(None, "dog", None),
               TypoSample(None, "dog", "cup")]
    cands = candidate_set(samples)  # [cup, dog, good]
    txt = torch.eye(3)
    reads = ["cup", "good", "dog", "dog"]  # the last attacked image resists the attack
    img = torch.stack([txt[cands.index(w)] for w in reads])
    r, _ = score_typographic(samples, img, txt, cands)
    assert (r["clean_accuracy"], r["attacked_accuracy"], r["attack_success_rate"]) == (1.0, 0.5, 0.5)


def test_typographic_imagefolder_with_projection(tmp_path, tiny_backbone):
    """The generator path on an image folder, through an EvalModel carrying a projection W."""
    from xclip.evaluation import typographic
    from xclip.evaluation.common import EvalModel

    for cls, colour in (("apple", "red"), ("sky", "blue")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            _solid(colour, 64).save(tmp_path / cls / f"{i}.png")
    parser = evaluate.build_parser()
    cfg = parser.parse_args(["--typographic.source", "imagefolder", "--typographic.data", str(tmp_path)])
    W = torch.nn.init.orthogonal_(torch.empty(16, tiny_backbone.embed_dim))
    model = EvalModel(tiny_backbone, projection=W)
    r = typographic.run(model, parser.instantiate(cfg).typographic)
    assert (r["n_clean"], r["n_attacked"], r["n_candidates"]) == (4, 4, 2)
    assert model.encode_texts(["x"]).shape == (1, 16)
    assert [row[0] for row in r["tables"]["per_attack_word"]["data"]] == ["apple", "sky"]


@pytest.mark.slow
def test_typographic_world_source(tmp_path):
    r = _run(tmp_path, "--suite", "typographic", "--typographic.source", "world", "--typographic.n", "20")
    assert (r["typographic"]["n_clean"], r["typographic"]["n_attacked"]) == (20, 20)


# ---- retrieval ------------------------------------------------------------------------------------------
def test_retrieval_suite_on_image_folder(tmp_path):
    for cls, colour in (("apple", "red"), ("sky", "blue"), ("grass", "green")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            _solid(colour, 48).save(tmp_path / "imgs" / cls / f"{i}.png")
    cap = tmp_path / "caps"
    cap.mkdir()
    with open(cap / "metadata.jsonl", "w") as f:
        for i, (c, colour) in enumerate((("a red square", "red"), ("a blue square", "blue"))):
            _solid(colour).save(cap / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n")
    r = _run(tmp_path, "--suite", "retrieval", "--retrieval.source", str(tmp_path / "imgs"), "--retrieval.n", "12",
             "--retrieval.canvas", "64", "--retrieval.captions", str(cap))["retrieval"]
    assert r["n"] == 12 and r["real/n"] + r["fake/n"] == 12 and r["captions/n"] == 2
    keys = [k for k in r if k.startswith(("real/", "fake/")) and "top" in k]
    tasks = {k.split("/")[1] for k in keys}
    assert tasks == {"im_t_txt_t", "im_it_img_t", "im_it_img_i", "im_it_txt_t"} or r["real/n"] == 0 or r["fake/n"] == 0
    for k in keys + ["zero_shot/acc_im_i_txt_i", "image_text/i2t_top1", "captions/t2i_top5"]:
        assert 0.0 <= r[k] <= 1.0
    assert r["captions/i2t_top5"] == 1.0  # 2 captions: top-5 always hits


# ---- OCR ------------------------------------------------------------------------------------------------
def test_ocr_iiit5k_local_layout(tmp_path):
    rng = random.Random(0)
    words = ["HELLO", "WORLD", "STOP", "CAFE"]
    samples = []
    for w in words:
        img, _ = draw_word(None, w, TextStyle(size=20), rng, canvas_size=(100, 32))
        small = [w] + [x for x in words if x != w][:2]
        samples.append((img, w, small, words + ["EXTRA"]))
    write_iiit5k_folder(tmp_path / "IIIT5K", samples)
    r = _run(tmp_path, "--suite", "ocr_iiit5k", "--ocr_iiit5k.root", str(tmp_path))["ocr_iiit5k"]
    assert r["n_images"] == 4 and r["n_full_words"] == 4 and r["label_in_small"] == 1.0
    for k in ("accuracy_small", "accuracy_1k", "accuracy_full"):
        assert r[k] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_ocr_lexicon_scoring_perfect_and_mix():
    from xclip.evaluation.ocr_iiit5k import lexicon_scores

    vocab = ["a", "b", "c"]
    idx = {w: i for i, w in enumerate(vocab)}
    txt = torch.eye(3)
    img = torch.stack([txt[0], txt[1], txt[1]])  # the third image reads "b" but is "c"
    assert float(lexicon_scores(img, txt, idx, [["a", "b"], ["b", "c"], ["a", "c"]], ["a", "b", "c"]).compute()) \
        == pytest.approx(2 / 3)
    # restricted to a lexicon without "b", image 3's best remaining candidate decides
    img3 = torch.stack([txt[0], txt[1], 0.9 * txt[1] + 0.1 * txt[2]])
    assert float(lexicon_scores(img3, txt, idx, [["a", "b"], ["b", "c"], ["a", "c"]], ["a", "b", "c"]).compute()) == 1.0
    assert float(lexicon_scores(img3, txt, idx, None, ["a", "b", "c"]).compute()) == pytest.approx(2 / 3)


def test_ocr_iiit5k_missing_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="testdata.mat"):
        _run(tmp_path, "--suite", "ocr_iiit5k", "--ocr_iiit5k.root", str(tmp_path / "empty"))


# ---- saliency -------------------------------------------------------------------------------------------
def test_saliency_prf_suite_perfect_and_mix(tmp_path):
    from xclip.metrics.saliency import boxes_to_masks

    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 16.0, 32.0]])
    maps = boxes_to_masks(boxes, 32, 32).float()[:, ::4, ::4] + 0.01 * torch.rand(2, 8, 8)  # 8x8 maps
    torch.save({"maps": maps, "boxes": boxes, "image_size": [32, 32], "texts": ["a", "b"]}, tmp_path / "m.pt")
    r = _run(tmp_path, "--suite", "saliency_prf", "--saliency_prf.file", str(tmp_path / "m.pt"))["saliency_prf"]
    assert r["precision"] > 0.85 and r["recall"] > 0.85 and r["n_pairs"] == 2
    exact = boxes_to_masks(boxes, 32, 32)
    left = torch.zeros(1, 32, 32)
    left[0, :, :16] = 1
    torch.save({"maps": torch.cat([exact[:1].float(), left]), "masks": torch.cat([exact[:1], exact[:1]])},
               tmp_path / "m2.pt")
    r = _run(tmp_path, "--suite", "saliency_prf", "--saliency_prf.file", str(tmp_path / "m2.pt"))["saliency_prf"]
    # pair 1 perfect; pair 2: left half (512 px) vs box 8..24 (256 px, 128 inside) -> P 0.25, R 0.5
    assert r["precision"] == pytest.approx((1 + 0.25) / 2) and r["recall"] == pytest.approx((1 + 0.5) / 2)
    torch.save({"maps": maps}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="saliency_prf: .*'boxes'"):
        _run(tmp_path, "--suite", "saliency_prf", "--saliency_prf.file", str(tmp_path / "bad.pt"))
    assert "'boxes'" in json.loads((tmp_path / "res.json").read_text())["suites"]["saliency_prf"]["error"]


# ---- text in image --------------------------------------------------------------------------------------
def _write_text_folder(root):
    for group, words in (("real", ["hello", None]), ("fake", ["zqx", None])):
        (root / group).mkdir(parents=True)
        for i, w in enumerate(words):
            img = Image.new("RGB", (64, 64), (200, 220, 240))
            if w:
                img, _ = draw_word(img, w, TextStyle(size=16))
            img.save(root / group / f"{i}.png")


def test_text_in_image_rates(tmp_path):
    _write_text_folder(tmp_path / "gen")
    r = _run(tmp_path, "--suite", "text_in_image", "--text_in_image.dir", str(tmp_path / "gen"))["text_in_image"]
    assert r["all/n"] == 4 and r["real/n"] == 2
    assert r["all/rate@0"] == 0.5 and r["real/rate@0"] == 0.5 and r["fake/rate@0"] == 0.5


def test_text_in_image_missing_tesseract_names_apt_package(tmp_path, monkeypatch):
    import xclip.metrics.text_in_image as tii

    _write_text_folder(tmp_path / "gen")
    monkeypatch.setattr(tii.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install tesseract-ocr"):
        _run(tmp_path, "--suite", "text_in_image", "--text_in_image.dir", str(tmp_path / "gen"))


# ---- detection ------------------------------------------------------------------------------------------
def _write_detection(root):
    root.mkdir()
    ann = {"0.png": [{"label": "dog", "box": [214, 41, 562, 285]}], "1.png": [{"label": "cat", "box": [10, 10, 100, 100]}]}
    for f in ann:
        Image.new("RGB", (640, 320), (128, 128, 128)).save(root / f)
    (root / "annotations.json").write_text(json.dumps(ann))
    return ann


def test_detection_ap_from_predictions(tmp_path):
    ann = _write_detection(tmp_path / "gen")
    perfect = {f: [{**b, "score": 0.9} for b in boxes] for f, boxes in ann.items()}
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    r = _run(tmp_path, "--suite", "detection_ap", "--detection_ap.dir", str(tmp_path / "gen"),
             "--detection_ap.predictions", str(tmp_path / "perfect.json"))["detection_ap"]
    assert (r["AP"], r["AP50"], r["AR100"]) == (1.0, 1.0, 1.0)
    toy = {"0.png": [{"label": "dog", "box": [258, 41, 606, 285], "score": 0.9},
                     {"label": "person", "box": [0, 0, 5, 5], "score": 0.9}],  # class with no ground truth: ignored
           "1.png": [{"label": "cat", "box": [10, 10, 100, 100], "score": 0.8}]}
    (tmp_path / "toy.json").write_text(json.dumps(toy))
    r = _run(tmp_path, "--suite", "detection_ap", "--detection_ap.dir", str(tmp_path / "gen"),
             "--detection_ap.predictions", str(tmp_path / "toy.json"))["detection_ap"]
    assert r["AP"] == pytest.approx(0.8) and r["AP50"] == 1.0 and r["AP75"] == 1.0 and r["n_detections"] == 2


def test_detection_ap_tiny_detr_local_dir(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    from xclip.models.detr import DetrDetector

    torch.manual_seed(0)
    cfg = DetrConfig(backbone_config=ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                                  depths=[1, 1, 1, 1], out_features=["stage4"]),
                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                     num_labels=3, id2label={0: "dog", 1: "person", 2: "cat"}, label2id={"dog": 0, "person": 1, "cat": 2})
    DetrForObjectDetection(cfg).save_pretrained(tmp_path / "detr")
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(tmp_path / "detr")
    det = DetrDetector.from_pretrained(str(tmp_path / "detr"), ["cat", "dog"], threshold=0.0)
    out = det.detect([Image.new("RGB", (80, 40)), Image.new("RGB", (40, 40))])
    assert len(out) == 2 and set(out[0]["labels"].tolist()) <= {0, 1}  # "person" dropped, mapped to [cat, dog]
    assert out[0]["boxes"].shape[1] == 4 and (out[0]["boxes"][:, 2] <= 80.01).all()
    _write_detection(tmp_path / "gen")
    r = _run(tmp_path, "--suite", "detection_ap", "--detection_ap.dir", str(tmp_path / "gen"),
             "--detection_ap.detector", str(tmp_path / "detr"), "--detection_ap.threshold", "0.0")["detection_ap"]
    assert 0.0 <= r["AP"] <= 1.0 and r["n_images"] == 2


def test_detection_ap_missing_layout(tmp_path):
    (tmp_path / "gen").mkdir()
    with pytest.raises(SystemExit, match="annotations.json"):
        _run(tmp_path, "--suite", "detection_ap", "--detection_ap.dir", str(tmp_path / "gen"),
             "--detection_ap.predictions", str(tmp_path / "p.json"))
