"""Public checkpoints: a state dict with the public key names converts into a model computing the same function."""

import pytest
import torch
from conftest import randomize
from public_reference import PublicXMDPT

from xmdpt.cli import main
from xmdpt.errors import InputError
from xmdpt.models.convert import convert_public_checkpoint
from xmdpt.models.xmdpt import XMDPT, random_masking


@pytest.fixture
def public_checkpoint(tmp_path):
    reference = randomize(PublicXMDPT(), std=0.1, seed=3)
    path = tmp_path / "ema_0.9999_300000.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


def inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(batch, 4, 8, 8, generator=g),
        t=torch.tensor([0, 400, 999])[:batch],
        pose=torch.randn(batch, 5, 16, generator=g),
        img=torch.randn(batch, 7, 24, generator=g),
        src=torch.randn(batch, 4, 8, 8, generator=g),
    )


def test_converted_model_computes_the_public_function(public_checkpoint, tmp_path):
    reference, path = public_checkpoint
    model = convert_public_checkpoint(path, tmp_path / "converted")
    loaded = XMDPT.from_pretrained(tmp_path / "converted")
    assert loaded.config.sample_size == [8, 8] and loaded.config.depth == 3 and loaded.config.num_heads == 2
    a = inputs()
    keep = torch.tensor([1.0, 0.0, 1.0])
    expected = reference(a["x"], a["t"], a["pose"], a["img"], a["src"], keep)
    ours = loaded(a["x"], a["t"], loaded.encode_conditions(a["pose"], a["img"], a["src"]), drop_condition=keep == 0)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().mean() > 0.1  # a random model, not the zero-initialised one
    # The masked training pass too, on the same mask.
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    expected = reference(a["x"], a["t"], a["pose"], a["img"], a["src"], keep, mask_noise=noise)
    ids = random_masking(3, 16, 0.3, generator=torch.Generator().manual_seed(4))
    conditions = model.encode_conditions(a["pose"], a["img"], a["src"])
    ours = model(a["x"], a["t"], conditions, drop_condition=keep == 0, ids_keep=ids)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_cli_convert_writes_a_loadable_folder(public_checkpoint, tmp_path):
    _, path = public_checkpoint
    main(["convert", str(path), str(tmp_path / "out"), "--denoiser-only"])
    assert (tmp_path / "out" / "config.json").exists()
    assert XMDPT.from_pretrained(tmp_path / "out").num_parameters() == sum(
        v.numel() for k, v in torch.load(path, weights_only=True).items() if "relative_position_index" not in k
    )


def test_module_prefix_and_ema_wrapper_are_accepted(public_checkpoint, tmp_path):
    reference, _ = public_checkpoint
    path = tmp_path / "wrapped.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = convert_public_checkpoint(path)
    torch.testing.assert_close(model.pos_embed, reference.pos_embed)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint", "not a readable PyTorch checkpoint"),
        ({"weight": torch.zeros(2)}, "not an X-MDPT checkpoint"),
        ([1, 2, 3], "not a state dict"),
    ],
)
def test_files_that_are_not_checkpoints_are_clear_errors(tmp_path, content, message, capsys):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(InputError, match=message):
        convert_public_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_wrong_grid_are_clear_errors(public_checkpoint, tmp_path):
    _, path = public_checkpoint
    with pytest.raises(InputError, match="no such file"):
        convert_public_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="does not hold"):
        convert_public_checkpoint(path, grid_size=(4, 3))
    with pytest.raises(InputError, match="relative_position_index"):
        convert_public_checkpoint(path, grid_size=(2, 8))


def test_checkpoint_with_unknown_extra_keys_is_rejected(public_checkpoint, tmp_path):
    reference, _ = public_checkpoint
    state = dict(reference.state_dict(), extra_head=torch.zeros(3))
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(InputError, match="unexpected"):
        convert_public_checkpoint(tmp_path / "odd.pt")


def test_cli_refuses_an_output_that_is_a_file_and_options_that_do_not_fit(public_checkpoint, tmp_path, capsys):
    _, path = public_checkpoint
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out, extra, message in ((taken, [], "is not a folder"), (tmp_path / "o", ["--decode-layers", "0"], "decode")):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(path), str(out), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert taken.read_text() == "keep me"
    main(["convert", str(path), str(tmp_path / "ok"), "--denoiser-only"])  # and a good one still writes its folder
    assert (tmp_path / "ok" / "config.json").is_file()


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (b"not a checkpoint", [], "not a readable PyTorch checkpoint"),
        ([1, 2, 3], [], "not a state dict"),
        (None, ["--grid", "4x3"], "does not hold the checkpoint's 16 tokens"),
        (None, ["--grid", "2x8"], "relative_position_index"),
        (None, ["--decode-layers", "0"], "decode_layers=0"),
    ],
)
def test_cli_errors_name_the_checkpoint_once(public_checkpoint, tmp_path, capsys, content, extra, message):
    # An InputError is a ValueError: the command prefixed the path to messages that already began with it.
    _, path = public_checkpoint
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(path), str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and err.count(str(path)) == 1 and message in err, err
    assert len(err.splitlines()) == 1


def test_a_checkpoint_without_read_permission_is_reported_as_such(public_checkpoint, tmp_path, monkeypatch, capsys):
    # Tests run as root, where chmod 000 does not stop reads: torch.load is made to meet the refusal instead.
    _, path = public_checkpoint

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(SystemExit):
        main(["convert", str(path), str(tmp_path / "out")])
    assert capsys.readouterr().err == f"error: {path}: cannot read the checkpoint: permission denied\n"
