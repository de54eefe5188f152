"""Deletion queue: ff.erase_batch / ff.withdraw / `fastforget batch` on the testbed.

The properties a user relies on: a bad line is refused (naming the line and field) before the model is
loaded; one batch equals the closed-form solve over the same rows; an incremental add equals one solve over
the union; a withdrawn person comes back as the unedited model draws them while the others stay erased;
the saved folder is atomic and its ledger holds ids and salted fingerprints only."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastforget as ff
from fastforget.batch import BatchStatistics, parse_requests, request_seed
from fastforget.errors import ConflictError, InputError, OutputExistsError

TARGETS = [7100, 7101, 7102, 7103]  # held-out testbed identities (benchmarks use 0.., 100.., 200000..)


def _emb(encoder, ids):
    from fastforget.identity.embeddings import to_embeddings

    return to_embeddings(list(ids), encoder, per_identity=2)


@pytest.fixture(scope="module")
def queue(encoder):
    e = _emb(encoder, TARGETS)
    ret = _emb(encoder, [7200, 7201])
    return [{"id": "req-a", "targets": [e[0].tolist()], "retain": ret.tolist()},
            {"id": "req-b", "targets": [e[1].tolist()]},
            {"id": "req-c", "targets": [e[2].tolist(), e[3].tolist()]}]


@pytest.fixture(scope="module")
def full(demo_model, queue):
    return ff.erase_batch(demo_model, queue, progress=False)


def _kv(res):
    return {k: v.double() for k, v in res.patch.new.items()}


# ---------------------------------------------------------------- request checks (no model needed)
@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "targets": [1]}\n{"id": "a", "targets": [2]}', "line 2: field 'id': duplicate request id 'a'"),
    ('{"id": "a", "targets": []}', "line 1: field 'targets': empty"),
    ('{"id": "a"}', "line 1: missing field 'targets'"),
    ('{"id": "", "targets": [1]}', "line 1: field 'id'"),
    ('{"id": "a", "targets": [1], "name": "x"}', "line 1: unknown field 'name'"),
    ('{"id": "a", "targets": ["nope.png"]}', "line 1: field 'targets': photo not found"),
    ('{"id": "a", "targets": "missing.npy"}', "line 1: field 'targets': file not found"),
    ('{"id": "a", "targets": [1]}\nnot json', "line 2: not valid JSON"),
    ('{"id": "a", "targets": [1], "retain": {"x": 1}}', "line 1: field 'retain'"),
])
def test_bad_lines_are_named_before_the_model_loads(tmp_path, line, message):
    path = tmp_path / "requests.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError) as info:
        ff.erase_batch(str(tmp_path / "no-such-model"), str(path), progress=False)  # a model load would fail
    assert message in str(info.value)


def test_npy_targets_are_checked_and_read_relative_to_the_file(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.float32))
    np.save(tmp_path / "good.npy", np.eye(2, 512, dtype=np.float32))
    (tmp_path / "q.jsonl").write_text('{"id": "x", "targets": "bad.npy"}\n')
    with pytest.raises(InputError, match="line 1: field 'targets'"):
        parse_requests(tmp_path / "q.jsonl")
    (tmp_path / "q.jsonl").write_text('{"id": "x", "targets": "good.npy"}\n')
    (req,) = parse_requests(tmp_path / "q.jsonl")
    assert req.targets.shape == (2, 512)


def test_a_target_retained_by_another_request_is_refused(demo_model, encoder, queue):
    e = _emb(encoder, [7300])
    bad = queue + [{"id": "req-d", "targets": [e[0].tolist()]}, {"id": "req-e", "targets": [7301],
                                                                 "retain": [e[0].tolist()]}]
    with pytest.raises(ConflictError, match=r"requests\[3\]: field 'targets'\[0\] .* requests\[4\]: field 'retain'"):
        ff.erase_batch(demo_model, bad, progress=False)


# ---------------------------------------------------------------- the solve
def test_one_request_equals_the_closed_form_solve(demo_model, encoder):
    """A batch of one request is closed_form's own solve (same rows, same preservation)."""
    from fastforget.identity.anchors import select_anchors
    from fastforget.identity.preservation import testbed_set
    from fastforget.methods import ErasureRequest
    from fastforget.methods.closed_form import CLOSED_FORM_DEFAULTS as D, solve_kv_map
    from fastforget.patch import get_parameter

    e = _emb(encoder, TARGETS[:2])
    res = ff.erase_batch(demo_model, [{"id": "one", "targets": e.tolist()}], progress=False)
    pres = testbed_set(encoder).embeddings
    rs = request_seed(0, "one")
    anchors, _ = select_anchors(e, pres, tau=0.2, seed=rs)
    t, _ = solve_kv_map(demo_model, ErasureRequest(e, anchors, None, pres), erase_weight=D["erase_weight"],
                        preserve_weight=D["preserve_weight"], lam=D["lam"], neighbours=D["neighbours"],
                        neighbour_cos=tuple(D["neighbour_cos"]), use_preserve=True, seed=rs,
                        retain_weight=D["retain_weight"], neighbour_map=D["neighbour_map"])
    for name, new in res.patch.new.items():
        ref = (get_parameter(demo_model, name).detach().double() @ t).float()
        assert torch.allclose(new, ref, atol=1e-5, rtol=1e-4), name
    assert res.report.metrics["target_residual"] < 0.2


def test_incremental_add_equals_one_solve_over_the_union(demo_model, queue, full, tmp_path):
    first = ff.erase_batch(demo_model, queue[:2], progress=False)
    ids_before = first.statistics.ids()
    more = ff.erase_batch(first, queue[2:], progress=False)
    assert first.statistics.ids() == ids_before  # the batch extended is not modified
    for k, v in _kv(full).items():
        assert torch.allclose(_kv(more)[k], v, atol=1e-6), k
    assert [r["id"] for r in more.ledger["requests"]] == ["req-a", "req-b", "req-c"]
    # the same through a saved folder (the next week's queue arrives in another process)
    first.save(tmp_path / "week1")
    (tmp_path / "week2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queue[2:]))
    again = ff.erase_batch(str(tmp_path / "week1"), str(tmp_path / "week2.jsonl"), progress=False)
    for k, v in _kv(full).items():
        assert torch.allclose(_kv(again)[k], v, atol=1e-6), k
    with pytest.raises(ConflictError, match="req-c"):
        ff.erase_batch(again, queue[2:], progress=False)


def _kv_out(model, emb):
    """Every attn2 to_k / to_v output of emb's states, stacked."""
    from fastforget.methods.base import attn2_kv_names
    from fastforget.patch import get_parameter

    with torch.no_grad():
        c = model.condition(emb).double().reshape(-1, model.text_width)
        out = torch.cat([c @ get_parameter(model, n).detach().double().T for n in attn2_kv_names(model)], 1)
        return out.reshape(len(emb), -1)  # one row per identity: every token, every layer


def test_withdrawal_restores_that_person_and_keeps_the_others_erased(demo_model, encoder, queue, full):
    e = _emb(encoder, TARGETS)
    back = ff.withdraw(full, ["req-b"])
    assert full.statistics.ids("withdrawn") == []  # the input result is not modified
    before = _kv_out(demo_model, e)
    moved_erased = (_kv_out(full.model, e) - before).norm(dim=1)
    moved_back = (_kv_out(back.model, e) - before).norm(dim=1)
    # req-b (target 1): at least 5x closer to the unedited model than when erased; the others stay erased
    assert moved_back[1] < 0.2 * moved_erased[1]
    for i in (0, 2, 3):
        assert moved_back[i] > 0.8 * moved_erased[i]
    # what a user sees: req-b's generation is the unedited one again, req-a's is still someone else
    with torch.no_grad():
        g0 = encoder.encode_tensor(demo_model.generate_tensor(e[:2], seed=3, steps=10))
        g_back = encoder.encode_tensor(back.model.generate_tensor(e[:2], seed=3, steps=10))
    assert float(g0[1] @ g_back[1]) > 0.9
    assert float(g_back[0] @ e[0]) < 0.5 * float(g0[0] @ e[0])
    assert [r["status"] for r in back.ledger["requests"]] == ["erased", "withdrawn", "erased"]
    assert back.patch.metadata["requests"] == ["req-a", "req-c"]
    with pytest.raises(ConflictError, match="already withdrawn"):
        ff.withdraw(back, ["req-b"])
    with pytest.raises(InputError, match="'nope' is not in this batch"):
        ff.withdraw(full, ["nope"])


def test_withdrawal_equals_a_fresh_queue_with_the_person_withdrawn(demo_model, queue, full):
    """withdraw(A+B+C, B) == (A+C, then B added, then B withdrawn): withdrawal is a rank update of the solve."""
    ac = ff.erase_batch(demo_model, [queue[0], queue[2]], progress=False)
    acb = ff.erase_batch(ac, [queue[1]], progress=False)
    a = ff.withdraw(full, ["req-b"])
    b = ff.withdraw(acb, ["req-b"])
    for k, v in _kv(a).items():
        assert torch.allclose(_kv(b)[k], v, atol=1e-6), k


# ---------------------------------------------------------------- outputs
def test_saved_folder_ledger_holds_ids_and_fingerprints_only(full, queue, encoder, tmp_path):
    from fastforget.patch import Patch, fingerprint_embeddings

    out = full.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model", "patch.safetensors", "report.json", "ledger.json",
                                               "statistics.safetensors"}
    ledger = json.loads((out / "ledger.json").read_text())
    text = (out / "ledger.json").read_text() + (out / "report.json").read_text()
    e = torch.tensor(queue[1]["targets"])
    assert ledger["requests"][1]["targets"] == fingerprint_embeddings(e)
    for value in e[0, :8].tolist() + torch.tensor(queue[0]["retain"])[0, :8].tolist():
        assert f"{value:.4f}"[:7] not in text  # no raw embedding value leaks
    assert Patch.load(out / "patch.safetensors").fingerprint() == full.patch.fingerprint()
    stats = BatchStatistics.load(out / "statistics.safetensors")
    assert stats.ids() == ["req-a", "req-b", "req-c"] and torch.allclose(stats.solve(), full.statistics.solve())
    reloaded = ff.load(str(out / "model"))
    name = full.patch.names[0]
    from fastforget.patch import get_parameter

    assert torch.equal(get_parameter(reloaded, name), full.patch.new[name])
    with pytest.raises(OutputExistsError):
        full.save(out)
    back = ff.withdraw(str(out), ["req-a"])  # from the folder, in a later process
    assert back.statistics.ids("withdrawn") == ["req-a"]


def test_photos_of_one_request_are_one_person(demo_model, tmp_path):
    from PIL import Image

    ims, _ = ff.testbed.render([7400], 3, seed=0)
    paths = []
    for i, im in enumerate(ims):
        Image.fromarray(im).save(tmp_path / f"p{i}.png")
        paths.append(f"p{i}.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "selfies", "targets": paths}) + "\n")
    res = ff.erase_batch(demo_model, str(tmp_path / "q.jsonl"), progress=False)
    assert res.statistics.requests[0].n_targets == 1 and len(res.ledger["requests"][0]["targets"]) == 1


def test_cli_batch_and_withdraw(queue, tmp_path, capsys):
    from fastforget.cli import main

    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in queue[:2]))
    assert main(["batch", str(q), "--model", "demo", "--out", str(tmp_path / "out"), "--quiet", "--verify", "1",
                 "--verify-n", "1"]) == 0
    done, checked = (json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:])
    assert done["requests"] == ["req-a", "req-b"]
    assert checked["requests"] == ["req-a"] and (tmp_path / "out" / "verify.json").is_file()
    assert checked["metrics"]["ism_f"] < checked["metrics"]["ism_f_before"]
    assert main(["batch", str(q), "--model", str(tmp_path / "out"), "--withdraw", "req-a",
                 "--out", str(tmp_path / "out2"), "--quiet"]) == 0
    ledger = json.loads((tmp_path / "out2" / "ledger.json").read_text())
    assert [r["status"] for r in ledger["requests"]] == ["withdrawn", "erased"]
    q.write_text('{"id": "x", "targets": []}\n')
    assert main(["batch", str(q), "--model", "demo", "--out", str(tmp_path / "out3"), "--quiet"]) == 2
    assert "line 1: field 'targets': empty" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()


def test_mlp_structure_is_incremental_and_withdrawable(demo_model, queue):
    """The keyed structure (last text-encoder MLP) has the same normal-equation form: add and withdraw are
    rank updates there too, and the edit lands in the one tensor it names."""
    from fastforget.batch import mlp_name

    full = ff.erase_batch(demo_model, queue, structure="mlp", progress=False)
    assert full.patch.names == [mlp_name(demo_model)]
    assert full.report.metrics["target_residual"] < 0.5
    more = ff.erase_batch(ff.erase_batch(demo_model, queue[:1], structure="mlp", progress=False), queue[1:],
                          progress=False)
    assert torch.allclose(_kv(more)[mlp_name(demo_model)], _kv(full)[mlp_name(demo_model)], atol=1e-6)
    back = ff.withdraw(full, ["req-b"])
    assert back.report.metrics["withdrawn_movement"] < 0.2 * full.report.metrics["target_residual"] + 0.2
    with pytest.raises(InputError, match="structure"):
        ff.erase_batch(demo_model, queue, structure="dense", progress=False)


def test_a_target_inside_the_preservation_gallery_is_left_out_and_put_back(demo_model, encoder):
    """A gallery row that is the target would be held and erased at once: the batch leaves it out (as
    ff.erase does), the same as a gallery without it, and a withdrawal holds it again."""
    e = _emb(encoder, [7700, 7701])
    others = _emb(encoder, range(7710, 7740))
    gallery = torch.cat([others[:10], e[:1], others[10:]])
    req = [{"id": "in-gallery", "targets": [e[0].tolist()]}, {"id": "other", "targets": [e[1].tolist()]}]
    res = ff.erase_batch(demo_model, req, preserve=gallery, progress=False)
    assert res.statistics.requests[0].dropped == [10] and res.statistics.requests[1].dropped == []
    ref = ff.erase_batch(demo_model, req, preserve=others, progress=False)
    a, a_ref = res.statistics.normal_equations()[0], ref.statistics.normal_equations()[0]
    assert torch.allclose(a, a_ref, rtol=1e-9, atol=1e-6 * float(a_ref.abs().max()))
    back = ff.withdraw(res, ["in-gallery"])
    full = ff.erase_batch(demo_model, req[1:], preserve=gallery, progress=False)  # nobody drops row 10
    held = back.statistics.normal_equations()[0] - full.statistics.normal_equations()[0]
    s = back.statistics.requests[0].src.double()  # what remains: exactly the withdrawn person's held rows
    w_r = back.statistics.config["retain_weight"]
    assert torch.allclose(held, w_r * s.T @ s, atol=1e-6 * float(held.abs().max()))
