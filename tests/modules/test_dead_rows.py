"""DeadRows (modules/dead_rows.py): the fixed logit of vocabulary rows a converted original lacked."""
import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.modules.dead_rows import DeadRows, dead_rows_state, stored_dead_rows

V, D = 9, 5


def _output(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def test_fixed_logit_equals_stored_rows_bit_for_bit_and_blocks_their_gradient():
    weight, bias = _output()
    dead = [0, 1, 3]
    h = torch.randn(4, 3, D, dtype=torch.float64)
    stored_w, stored_b = weight.clone(), bias.clone()
    stored_w[dead], stored_b[dead] = 0, -40.0  # the layout before DeadRows
    module = DeadRows(V, bias="b", weight="w").double()
    module.set_dead(dead, -40.0)
    w, b = weight.clone(), bias.clone()
    w[dead], b[dead] = 0, 0
    w.requires_grad_(), b.requires_grad_()
    logits = module(F.linear(h, w, b))
    assert torch.equal(logits, F.linear(h, stored_w, stored_b))
    logits.logsumexp(-1).sum().backward()
    assert torch.count_nonzero(w.grad[dead]) == 0 and torch.count_nonzero(b.grad[dead]) == 0
    assert torch.count_nonzero(b.grad) == V - len(dead)


def test_columns_limit_the_mask_to_an_adaptive_head():
    module = DeadRows(V, bias="b", weight="w")
    module.set_dead([2], -30.0)
    head = torch.zeros(2, 6)  # shortlist 4 + 2 cluster logits
    out = module(head, columns=4)
    assert out[:, 2].eq(-30).all() and torch.count_nonzero(out) == 2


def test_no_dead_rows_is_a_no_op_and_load_sets_active():
    module = DeadRows(V, bias="b", weight="w")
    logits = torch.randn(3, V)
    assert module(logits) is logits
    other = DeadRows(V, bias="b", weight="w")
    other.load_state_dict(dead_rows_state("", V, [0, 1], -40.0))
    assert other.active and other(logits)[:, :2].eq(-40).all()


@pytest.mark.parametrize("ids,logit,message", [([5], -40.0, "only the fairseq specials"),
                                               ([0], -3.0, "real probability")])
def test_bad_dead_rows_are_refused(ids, logit, message):
    with pytest.raises(ValueError, match=message):
        DeadRows(V, bias="b", weight="w").set_dead(ids, logit)


def test_upgrade_moves_stored_rows_and_leaves_trained_checkpoints_alone():
    module = DeadRows(V, bias="output.bias", weight="output.weight")
    weight, bias = _output()
    weight[[0, 3]], bias[[0, 3]] = 0, -40.0
    state = {"decoder.output.weight": weight, "decoder.output.bias": bias.clone()}
    module.upgrade_state_dict_named(state, "decoder.dead_rows")
    assert state["decoder.dead_rows.mask"].nonzero().squeeze(1).tolist() == [0, 3]
    assert state["decoder.dead_rows.logit"].item() == -40.0
    assert torch.count_nonzero(state["decoder.output.bias"][[0, 3]]) == 0
    assert torch.equal(state["decoder.output.bias"][4:], bias[4:])
    # a trained model: non-zero rows, or a low bias on a live row: nothing is dead
    weight, bias = _output(1)
    bias[1] = -50.0
    assert stored_dead_rows(bias, weight) == []
    weight[1] = 0
    bias[2], weight[2] = -20.0, 0
    assert stored_dead_rows(bias, weight) == []  # two different values: not a converter's dead rows
    state = {"output.weight": weight, "output.bias": bias}
    DeadRows(V, bias="output.bias", weight="output.weight").upgrade_state_dict_named(state, "dead_rows")
    assert not state["dead_rows.mask"].any() and torch.equal(state["output.bias"], bias)
