"""The distillation loop: it lowers the KD loss, decays Φ on schedule, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_wan

from qvgen import QVGenConfig
from qvgen.train import FlowMatchingObjective, LatentDataset, TrainOptions, build_student, train
from qvgen.train.objectives import predict


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]
    txt = [torch.randn(5, 32, generator=g) for _ in range(n)]
    return LatentDataset(lat, txt, torch.zeros(5, 32))


def _kd_loss(teacher, student, ds, seed=123):
    obj = FlowMatchingObjective()
    g = torch.Generator().manual_seed(seed)
    lat = torch.stack(ds.latents[:4])
    txt = torch.stack(ds.texts[:4])
    batch = obj.make_inputs(lat, txt, g)
    with torch.no_grad():
        return float(obj.loss(predict(student, batch.inputs), predict(teacher, batch.inputs), {}))


def test_training_lowers_kd_loss_and_decays_phi(tmp_path):
    teacher = tiny_wan()
    cfg = QVGenConfig(rank=4, phase_steps=5, n_buckets=4)
    ds = _data()
    opts = TrainOptions(output_dir=tmp_path, steps=40, batch_size=2, lr=3e-4, progress=False, checkpoint_every=10)
    ptq, _ = build_student(teacher, QVGenConfig(rank=0, n_buckets=4), progress=False)
    before = _kd_loss(teacher, ptq, ds)  # the same W4A4 model before any training (round-to-nearest)
    result = train(teacher, cfg, ds, opts)
    after = _kd_loss(teacher, result.student, ds)
    assert after < 0.9 * before, (before, after)
    ranks = [r["rank"] for r in result.history]
    assert ranks[0] == 4 and ranks[5] == 2 and ranks[10] == 1 and ranks[15] == 0 and ranks[-1] == 0
    assert len(ranks) == 40
    assert all(m.phi_down is None for m in result.student.modules() if hasattr(m, "phi_down"))
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(40))
    assert {"loss", "rank", "grad_norm", "lr", "clip_lr"} <= set(rows[0])
    assert rows[0]["clip_lr"] > rows[0]["lr"]


def _run(out, steps, total=12, crash_at=None):
    teacher = tiny_wan()
    cfg = QVGenConfig(rank=4, phase_steps=3, n_buckets=2)
    opts = TrainOptions(
        output_dir=out, steps=total, batch_size=2, lr=1e-3, progress=False, checkpoint_every=4, caption_dropout=0.3
    )

    def crash(step, rec):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt("simulated crash")

    return train(teacher, cfg, _data(), opts, on_step=crash)


def test_interrupted_run_resumes_to_the_same_state(tmp_path):
    full = _run(tmp_path / "a", 12)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 12, crash_at=9)  # dies after step 9; last checkpoint at step 8
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-0000004", "step-0000008"]
    resumed = _run(tmp_path / "b", 12)
    assert resumed.resumed_from == 8
    sa, sb = full.student.state_dict(), resumed.student.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)
    la = [r["loss"] for r in full.history]
    lb = [r["loss"] for r in resumed.history]
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-9)


def test_bad_options_and_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        LatentDataset([], [], torch.zeros(1))
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainOptions(mixed_precision="fp8")
    with pytest.raises(ValueError, match="steps"):
        TrainOptions(steps=0)
