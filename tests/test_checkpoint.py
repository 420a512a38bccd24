import json
from pathlib import Path

import pytest
import torch

from deployq.checkpoint import CheckpointMeta, load_checkpoint, read_payload, save_checkpoint
from deployq.elastic import convert
from deployq.errors import UserError
from deployq.models import build_model
from deployq.spec import ElasticSpace, Form


class PickledThing:
    """Any pickled object: weights_only loading must refuse it."""


ARGS = {"num_classes": 10, "in_channels": 3, "input_size": 8, "width": 4}
SPACE = ElasticSpace(wbits=(2, 4, 8), abits=(2, 4, 8))


def _meta(**kw) -> CheckpointMeta:
    base = {
        "model": "resnet20",
        "model_args": ARGS,
        "space": SPACE,
        "preprocessing": {"size": 8, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "channel_order": "RGB"},
        "class_names": tuple(str(i) for i in range(10)),
        "train_config": {"epochs": 1, "data": "digits"},
        "metrics": {"epochs": [{"epoch": 1, "holdout_top1": {"highest": 0.9}}]},
        "epoch": 1,
    }
    base.update(kw)
    return CheckpointMeta(**base)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = convert(build_model("resnet20", **ARGS).eval(), SPACE)
    net.calibrate([torch.randn(8, 3, 8, 8)])
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.set_active(net.uniform_spec(Form(), 4))
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    save_checkpoint(path, net, _meta(), {"stage": "supernet", "epoch": 1, "optimizer": opt.state_dict()})
    return net, path


def test_round_trip_rebuilds_the_same_supernet(saved):
    net, path = saved
    ckpt = load_checkpoint(path)
    assert ckpt.meta == _meta()
    assert ckpt.extra["epoch"] == 1 and ckpt.extra["stage"] == "supernet"
    a, b = net.state_dict(), ckpt.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 3, 8, 8)
    spec = net.uniform_spec(Form(False, False, False), 2)
    with torch.no_grad():
        net.set_active(spec)
        ckpt.net.set_active(spec)
        assert torch.equal(net(x), ckpt.net(x))
    assert len(ckpt.sha256) == 64


def test_loads_with_weights_only_and_meta_is_json(saved):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["schema"] == "deployq.checkpoint"
    meta = json.loads(payload["meta_json"])
    assert meta["space"]["wbits"] == [2, 4, 8]
    # optimizer state is plain tensors / numbers
    state = payload["extra"]["optimizer"]
    assert state["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "truncated.pt"
    data = Path(path).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a loadable deployq checkpoint"):
        load_checkpoint(bad)


def test_foreign_checkpoints_are_refused(tmp_path):
    sd = build_model("resnet20", **ARGS).state_dict()
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    with pytest.raises(UserError, match="not a deployq checkpoint"):
        read_payload(plain)

    pickled = tmp_path / "pickled.pt"
    torch.save({"schema": "deployq.checkpoint", "obj": PickledThing()}, pickled)
    with pytest.raises(UserError, match="not a loadable"):
        read_payload(pickled)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(UserError):
        read_payload(text)
    with pytest.raises(UserError, match="does not exist"):
        read_payload(tmp_path / "missing.pt")


def test_weights_of_another_model_are_refused(saved, tmp_path):
    net, _ = saved
    path = tmp_path / "wrong.pt"
    save_checkpoint(path, net, _meta(model_args={**ARGS, "width": 8}))
    with pytest.raises(UserError, match="do not fit"):
        load_checkpoint(path)


def test_save_is_atomic(saved, tmp_path):
    net, _ = saved
    path = tmp_path / "a.pt"
    save_checkpoint(path, net, _meta())
    before = path.read_bytes()

    class Boom(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, net, _meta(), extra=Boom(x=1))
    # a failure while writing leaves the old file intact and no temporary behind
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
