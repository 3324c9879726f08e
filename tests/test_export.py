"""spark-me-export (timm weights, full model) and spark-me-reconstruct."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file as load_safetensors

from spark_me import SparK, build_sparse_encoder
from spark_me.checkpoint import FORMAT, CheckpointError, load_model, save_checkpoint
from spark_me.export import export_encoder, export_full
from spark_me.export import main as export_main
from spark_me.pretrain import load_init_weights
from spark_me.reconstruct_cli import main as reconstruct_main


def _trained_checkpoint(tmp_path, name="resnet18", width=64):
    """A checkpoint whose weights differ from any fresh initialisation."""
    torch.manual_seed(0)
    model = SparK(build_sparse_encoder(name), decoder_width=width, mask_ratio=0.6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    state = {"format": FORMAT, "model_name": name, "decoder_width": width, "mask_ratio": 0.6,
             "image_size": 64, "step": 7, "model": model.state_dict()}
    return model, save_checkpoint(state, tmp_path / "checkpoints", keep=1)


def test_encoder_export_loads_strictly_into_timm_and_computes_the_same_features(tmp_path):
    model, ckpt = _trained_checkpoint(tmp_path)
    out = export_encoder(ckpt, tmp_path / "resnet18_spark.pth")
    state = torch.load(out, weights_only=True)
    dense = timm.create_model("resnet18", num_classes=0)
    dense.load_state_dict(state, strict=True)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(state[k], v), k
    # every patch visible: the sparse encoder is the dense network, so timm sees our weights
    model.eval(), dense.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sparse_last = model.encoder(x, torch.ones(2, 2, 2, dtype=torch.bool))[-1]
        dense_last = dense.forward_features(x)  # (2, 512, 2, 2)
    got = torch.zeros_like(dense_last)
    c = sparse_last.C.long()
    got[c[:, 0], :, c[:, 1] // 32, c[:, 2] // 32] = sparse_last.F
    assert float((got - dense_last).norm() / dense_last.norm()) < 1e-4


def test_convnext_export_and_safetensors(tmp_path):
    _, ckpt = _trained_checkpoint(tmp_path, name="convnext_atto", width=64)
    out = export_encoder(ckpt, tmp_path / "atto.safetensors")
    timm.create_model("convnext_atto", num_classes=0).load_state_dict(load_safetensors(str(out)), strict=True)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_export_with_a_fresh_head_loads_strictly_into_a_classifier(tmp_path, name):
    model, ckpt = _trained_checkpoint(tmp_path, name=name, width=64)
    out = export_encoder(ckpt, tmp_path / "init.pth", num_classes=10)
    state = torch.load(out, weights_only=True)
    timm.create_model(name, num_classes=10).load_state_dict(state, strict=True)
    for k, v in model.encoder.timm_state_dict().items():
        assert torch.equal(state[k], v), k


def test_full_export_round_trips_for_continued_pretraining(tmp_path):
    model, ckpt = _trained_checkpoint(tmp_path)
    out = export_full(ckpt, tmp_path / "full.pt")
    loaded, meta = load_model(out)
    assert meta["model_name"] == "resnet18" and meta["step"] == 7 and "optimizer" not in meta
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    fresh = SparK(build_sparse_encoder("resnet18"), decoder_width=64)
    load_init_weights(fresh, out)  # model.init=<full export>
    assert torch.equal(fresh.decoder.proj.weight, model.decoder.proj.weight)
    encoder_only = SparK(build_sparse_encoder("resnet18"), decoder_width=64)
    load_init_weights(encoder_only, export_encoder(ckpt, tmp_path / "enc.pth"))  # model.init=<timm weights>
    assert torch.equal(encoder_only.encoder.conv1.weight, model.encoder.conv1.weight)
    with pytest.raises(CheckpointError, match="resnet34"):
        load_init_weights(SparK(build_sparse_encoder("resnet34"), decoder_width=64), out)


def test_export_cli_refuses_to_overwrite_and_reports_bad_checkpoints(tmp_path, capsys):
    _, ckpt = _trained_checkpoint(tmp_path)
    target = tmp_path / "enc.pth"
    export_main([str(ckpt), "--out", str(target)])
    assert target.is_file()
    with pytest.raises(SystemExit) as exc:
        export_main([str(ckpt), "--out", str(target)])
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err
    export_main([str(ckpt), "--out", str(target), "--force", "--num-classes", "5"])
    assert torch.load(target, weights_only=True)["fc.weight"].shape == (5, 512)
    export_main([str(ckpt), "--out", str(target), "--force", "--full"])
    assert torch.load(target, weights_only=True)["format"] == "spark_me.model.v1"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exc:
        export_main([str(broken), "--out", str(tmp_path / "x.pth")])
    assert exc.value.code == 1 and "truncated" in capsys.readouterr().err


def test_reconstruct_cli_writes_a_four_column_grid(tmp_path):
    _, ckpt = _trained_checkpoint(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(tmp_path / "gray.jpg")
    out = tmp_path / "grid.png"
    reconstruct_main([str(ckpt), str(folder), str(tmp_path / "gray.jpg"), "--out", str(out), "--size", "64"])
    grid = Image.open(out)
    assert grid.mode == "RGB" and grid.size == (4 * 66 - 2, 16 + 2 * 66 - 2)
    pixels = np.asarray(grid)
    assert pixels[16:80, 66:130].std() > 0  # the masked view is not blank
